"""Speech data for the streaming ASR model: open-vocabulary English text, three synthesizers, augmented
acoustics, kaldi-native-fbank features.

No speech corpus ships offline, so the corpus is synthesized (seeded, cached per part, :class:`SpeechCorpus`):

- **text** (:mod:`deepship.models.asr.text`): sentences from everyday templates, tiny-shakespeare, the
  King James Bible, the Python documentation, spoken numbers/times/names, short phrases and isolated
  dictionary words; held out by document, with test words never in any training text;
- **voices** (:mod:`deepship.models.asr.voices`): espeak-ng (7 accents x voice variants) and Festival
  (three voices from real speakers) in training; Flite (five voices) only in the unseen-synthesizer test set;
- **acoustics**: speed perturbation, room reverberation (pyroomacoustics), microphone EQ and
  band-limiting (audiomentations), coloured noise at 0-20 dB SNR, leading/trailing silence on
  training audio; the sentence test set also has a copy at 10 dB SNR;
- **features**: 80-dim log-mel filterbank, 25 ms window, 10 ms shift, computed with
  ``kaldi_native_fbank.OnlineFbank`` (:func:`fbank`), which is also what the streaming runner and the
  deployment bundle use, so training, export and deployment see identical features.

Audio is 16 kHz mono float32 in [-1, 1]; synthesizer output is resampled with ``soxr``.
"""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataError
from ...utils import atomic_file, cache_root, first_line, stable_hash
from . import text as T
from . import voices as V
from .text import sentences  # noqa: F401
from .voices import ACCENTS, TEST_VARIANTS, TRAIN_VARIANTS, resample  # noqa: F401

SAMPLE_RATE = 16000
N_MELS = 80
FRAME_SHIFT_MS = 10
FRAME_LENGTH_MS = 25
#: characters of the CTC vocabulary (index 0 is the blank)
CHARS = " abcdefghijklmnopqrstuvwxyz'"
VOCAB = ["<blk>"] + list(CHARS)

SPEECH_VERSION = 2


def espeak_available() -> bool:
    """Whether espeak-ng, the synthesizer every ASR test set uses, is installed."""
    return V.available("espeak")


def speech_tools_available() -> bool:
    """Whether every synthesizer and text source of the corpus is installed (espeak-ng, Festival, Flite,
    bible-kjv, python3.11-doc, wamerican)."""
    return all(V.available(e) for e in V.PROGRAMS) and T.WORDS_FILE.is_file() and T.PYDOCS.is_dir() and \
        shutil.which("bible") is not None


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """Add white, pink or brown noise at ``snr_db`` (dB, relative to the speech power of ``x``)."""
    kind = kind or str(rng.choice(["white", "pink", "brown"]))
    n = len(x)
    w = rng.standard_normal(n)
    if kind != "white":
        f = np.fft.rfft(w)
        freqs = np.fft.rfftfreq(n)
        freqs[0] = freqs[1] if n > 1 else 1.0
        f /= np.sqrt(freqs) if kind == "pink" else freqs
        w = np.fft.irfft(f, n)
    p_sig = float(np.mean(x.astype(np.float64) ** 2)) + 1e-12
    p_noise = float(np.mean(w ** 2)) + 1e-12
    y = x + w * np.sqrt(p_sig / (p_noise * 10 ** (snr_db / 10)))
    return np.clip(y, -1, 1).astype(np.float32)


def fbank_options():
    """The ``kaldi_native_fbank.FbankOptions`` of every feature in deepship's ASR (80 mels, 25/10 ms, no dither)."""
    import kaldi_native_fbank as knf

    o = knf.FbankOptions()
    o.frame_opts.samp_freq = SAMPLE_RATE
    o.frame_opts.dither = 0.0
    o.frame_opts.snip_edges = False
    o.frame_opts.frame_length_ms = FRAME_LENGTH_MS
    o.frame_opts.frame_shift_ms = FRAME_SHIFT_MS
    o.mel_opts.num_bins = N_MELS
    return o


def fbank(x: np.ndarray) -> np.ndarray:
    """Log-mel fbank of a whole 16 kHz waveform: float32 ``(frames, 80)``, 100 frames/s.

    Same computation as the streaming path (``OnlineFbank`` fed all samples, then finished).
    """
    import kaldi_native_fbank as knf

    f = knf.OnlineFbank(fbank_options())
    f.accept_waveform(SAMPLE_RATE, np.asarray(x, np.float32).tolist())
    f.input_finished()
    n = f.num_frames_ready
    if n == 0:
        return np.zeros((0, N_MELS), np.float32)
    return np.stack([np.asarray(f.get_frame(i), np.float32) for i in range(n)])


def encode_text(text: str) -> np.ndarray:
    """Characters -> int64 CTC labels (1..len(CHARS)); characters outside :data:`CHARS` are dropped."""
    return np.array([CHARS.index(c) + 1 for c in text.lower() if c in CHARS], np.int64)


def decode_labels(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids if 0 < int(i) < len(VOCAB))


@dataclass
class SpeechSet:
    """Utterances as features: ``feats[i]`` float32 ``(frames_i, 80)``, ``texts[i]``, and per utterance
    the ``voice`` (``accent+variant``), ``snr_db`` (``inf`` = clean) and ``seconds``."""

    feats: list[np.ndarray]
    texts: list[str]
    voices: list[str]
    snr_db: np.ndarray
    seconds: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "SpeechSet":
        idx = list(idx)
        return SpeechSet([self.feats[i] for i in idx], [self.texts[i] for i in idx], [self.voices[i] for i in idx],
                         self.snr_db[idx], self.seconds[idx])


#: the parts of a corpus, each synthesized and cached on its own (a test run never builds ``train``)
PARTS = ("train", "calib", "sentences", "unseen_synth", "words")
#: the held-out test sets: seen synthesizers speaking held-out sentences with unseen words, the unseen
#: synthesizer (Flite) speaking held-out sentences, and isolated unseen dictionary words (every synthesizer)
TEST_SETS = ("sentences", "unseen_synth", "words")


class SpeechCorpus:
    """A seeded speech corpus (:data:`DEFAULT_RECIPE`), its parts synthesized on first use and cached:

    - ``train``: training texts (:func:`deepship.models.asr.text.text_plan`) spoken by
      :data:`~deepship.models.asr.voices.TRAIN_ENGINES`, augmented (:class:`~deepship.models.asr.voices.Augmenter`);
    - ``calib``: a few more training-like utterances (INT8 calibration);
    - ``test`` (= ``sets["sentences"]``): held-out sentences, each with a word no training text has, spoken
      by held-out espeak-ng variants and the Festival voices; ``test_noisy``: the same at ``test_snr_db``;
    - ``sets["unseen_synth"]``: held-out sentences spoken by Flite, never heard in training;
    - ``sets["words"]``: isolated dictionary words never in any training text, spoken by all three.

    Test sets are clean; ``audio(name)`` gives their 16 kHz waveforms (``test_audio`` = the sentences')."""

    def __init__(self, recipe: dict, progress=None):
        self.recipe = recipe
        self.progress = progress
        self._parts: dict[str, tuple[SpeechSet, SpeechSet | None, list | None]] = {}

    def part(self, name: str) -> tuple[SpeechSet, SpeechSet | None, list | None]:
        if name not in self._parts:
            self._parts[name] = _part(self.recipe, name, self.progress)
        return self._parts[name]

    @property
    def train(self) -> SpeechSet:
        return self.part("train")[0]

    @property
    def calib(self) -> SpeechSet:
        return self.part("calib")[0]

    @property
    def test(self) -> SpeechSet:
        return self.part("sentences")[0]

    @property
    def test_noisy(self) -> SpeechSet:
        return self.part("sentences")[1]

    @property
    def test_audio(self) -> list[np.ndarray]:
        return self.part("sentences")[2]

    @property
    def sets(self) -> dict[str, SpeechSet]:
        return {k: self.part(k)[0] for k in TEST_SETS}

    def audio(self, name: str) -> list[np.ndarray]:
        return self.part(name)[2]


DEFAULT_RECIPE = {"text": {}, "test_text": {}, "max_words": 12, "calib": 64, "clean_fraction": 0.2,
                  "snr_db": [0.0, 20.0], "rir_fraction": 0.3, "test_snr_db": 10.0, "seed": 0}
#: a corpus small enough for a test to synthesize and train on in seconds (same recipe, fewer texts)
TINY_RECIPE = {"text": {"templates": 20, "shakespeare": 10, "bible": 10, "pydocs": 10, "spoken": 5, "phrases": 10,
                        "words": 20}, "test_text": {"sentences": 6, "unseen_synth": 6, "words": 6}, "calib": 4}


def _render(jobs: list[tuple[str, "V.Voice"]], workers: int = 4) -> list[np.ndarray]:
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda j: V.synthesize(*j), jobs))


def _pack(s: SpeechSet) -> dict:
    lens = np.array([len(f) for f in s.feats], np.int64)
    return {"feats": np.concatenate(s.feats).astype(np.float16) if len(s.feats) else np.zeros((0, N_MELS), np.float16),
            "lens": lens, "texts": np.array(s.texts), "voices": np.array(s.voices), "snr_db": s.snr_db,
            "seconds": s.seconds}


def _unpack(z, prefix: str) -> SpeechSet:
    lens = z[prefix + "lens"]
    off = np.concatenate([[0], np.cumsum(lens)])
    fe = z[prefix + "feats"].astype(np.float32)
    return SpeechSet([fe[off[i]:off[i + 1]] for i in range(len(lens))], [str(t) for t in z[prefix + "texts"]],
                     [str(v) for v in z[prefix + "voices"]], z[prefix + "snr_db"], z[prefix + "seconds"])


def speech_cache() -> Path:
    """Where synthesized corpora are cached: ``$DEEPSHIP_SPEECH_CACHE``, else ``<cache>/speech``.

    A corpus is deterministic data keyed by its recipe, so processes may share this folder (the
    tests' workers do) while keeping separate artifact caches."""
    import os

    env = os.environ.get("DEEPSHIP_SPEECH_CACHE")
    return Path(env) if env else cache_root() / "speech"


def corpus(recipe: dict | None = None, progress=None) -> SpeechCorpus:
    """The synthesized corpus for ``recipe`` (default :data:`DEFAULT_RECIPE`). Parts are built on first use
    and cached (a file lock makes parallel processes build each once): the three test sets take about a
    minute on 2 cores, the training part (6,200 utterances, about 3 h of audio) about 10 minutes.

    Raises:
        DataError: a synthesizer or text source is missing (the message names the Debian package).
    """
    return SpeechCorpus({**DEFAULT_RECIPE, **(recipe or {})}, progress)


def _voices(part: str, n: int, rng: np.random.Generator) -> list["V.Voice"]:
    if part in ("train", "calib"):
        engines = list(V.TRAIN_ENGINES)
        share = np.array([V.TRAIN_ENGINES[e] for e in engines])
        return [V.pick_voice(str(rng.choice(engines, p=share / share.sum())), rng) for _ in range(n)]
    if part == "unseen_synth":
        return [V.pick_voice(V.UNSEEN_ENGINE, rng) for _ in range(n)]
    engines = ["espeak", "festival"] + (["flite"] if part == "words" else [])
    return [V.pick_voice(engines[i % len(engines)], rng, held_out=True) for i in range(n)]


def _part(r: dict, part: str, progress) -> tuple[SpeechSet, SpeechSet | None, list | None]:
    key = stable_hash({"speech": r, "v": SPEECH_VERSION, "part": part, "train": V.TRAIN_VARIANTS,
                       "test": V.TEST_VARIANTS, "engines": V.TRAIN_ENGINES, "unseen": V.UNSEEN_ENGINE})
    path = speech_cache() / f"corpus-{part}-{key}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:  # parallel processes (test workers) build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    audio = None
                    if "audio" in z:
                        off = np.concatenate([[0], np.cumsum(z["audio_lens"])])
                        a = z["audio"].astype(np.float32) / 32767
                        audio = [a[off[i]:off[i + 1]] for i in range(len(off) - 1)]
                    return _unpack(z, "s_"), (_unpack(z, "noisy_") if "noisy_lens" in z else None), audio
            except Exception:  # a corrupt cache entry is rebuilt
                path.unlink(missing_ok=True)
        return _build_part(r, part, path, progress)


def _build_part(r: dict, part: str, path: Path, progress) -> tuple[SpeechSet, SpeechSet | None, list | None]:
    seed = int(r["seed"])
    plan = T.text_plan(r["text"], r["test_text"], seed, int(r["max_words"]))
    rng = np.random.default_rng([seed, PARTS.index(part)])
    if part == "calib":
        texts = [plan["train"][i] for i in rng.permutation(len(plan["train"]))[:int(r["calib"])]]
    else:
        texts = plan[part]
    voices = _voices(part, len(texts), rng)
    V.require({v.engine for v in voices})
    if progress:
        progress(f"synthesizing the ASR corpus's {part} part: {len(texts)} utterances (cached afterwards)")
    audio = _render(list(zip(texts, voices)))
    train_like = part in ("train", "calib")
    snr = np.full(len(audio), np.inf)
    if train_like:
        aug = V.Augmenter(seed + PARTS.index(part), float(r["clean_fraction"]), r["snr_db"], float(r["rir_fraction"]))
        for i, a in enumerate(audio):
            audio[i], snr[i] = aug(a, i)

    def mk(feats, snr_db):
        return SpeechSet(feats, list(texts), [v.label for v in voices], np.asarray(snr_db, np.float64),
                         np.array([len(a) / SAMPLE_RATE for a in audio]))

    s = mk([fbank(a) for a in audio], snr)
    arrays = {"s_" + k: v for k, v in _pack(s).items()}
    noisy = None
    if part == "sentences":
        noisy = mk([fbank(add_noise(a, float(r["test_snr_db"]), rng)) for a in audio], np.full(len(audio), float(r["test_snr_db"])))
        arrays.update({"noisy_" + k: v for k, v in _pack(noisy).items()})
    if not train_like:
        arrays["audio"] = (np.concatenate(audio).clip(-1, 1) * 32767).astype(np.int16)
        arrays["audio_lens"] = np.array([len(a) for a in audio], np.int64)
    with atomic_file(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return s, noisy, (None if train_like else audio)


def write_wav(path: str | Path, x: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """Write float32 mono ``x`` in [-1, 1] as a 16-bit PCM WAV file (clipped); returns ``path``."""
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(np.asarray(x, np.float32), -1, 1) * 32767).astype("<i2").tobytes())
    return Path(path)


def check_audio_file(path: str | Path):
    """The ``soundfile.info`` of ``path``; raises :class:`DataError` unless it is a readable audio file
    with at least one sample."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio file {path} not found; give a WAV/FLAC/OGG file")
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise DataError(f"cannot read {path} as audio ({first_line(e, 100)}); give a WAV, FLAC or OGG file") from None
    if info.frames == 0:
        raise DataError(f"audio file {path} has no samples; record some speech")
    return info


def audio_blocks(path: str | Path, seconds: float = 0.1):
    """Yield ``(mono float32 block, sample_rate)`` pieces of ``seconds`` from an audio file (any length).

    Raises:
        DataError: unreadable file, or NaN/infinite samples.
    """
    import soundfile as sf

    rate = check_audio_file(path).samplerate
    for b in sf.blocks(str(path), blocksize=max(1, int(rate * seconds)), dtype="float32", always_2d=True):
        x = b.mean(axis=1)
        if not np.all(np.isfinite(x)):
            raise DataError(f"audio file {path} holds NaN or infinite samples")
        yield x, rate


class To16k:
    """Streaming resampler from ``rate`` Hz to 16 kHz (``soxr.ResampleStream``, which keeps its filter
    state between pieces); a pass-through at 16 kHz. ``self(x)`` resamples a float32 mono piece,
    ``flush()`` returns the samples still held at the end of the stream."""

    def __init__(self, rate: int):
        self.rs = None
        if int(rate) != SAMPLE_RATE:
            import soxr

            self.rs = soxr.ResampleStream(int(rate), SAMPLE_RATE, 1, dtype="float32")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x if self.rs is None else self.rs.resample_chunk(x)

    def flush(self) -> np.ndarray:
        return np.zeros(0, np.float32) if self.rs is None else self.rs.resample_chunk(np.zeros(0, np.float32), last=True)


def audio_blocks_16k(path: str | Path, seconds: float = 0.1):
    """Like :func:`audio_blocks`, resampled to 16 kHz on the fly (:class:`To16k`); yields float32 blocks."""
    rs = None
    for x, rate in audio_blocks(path, seconds):
        rs = rs or To16k(rate)
        yield rs(x)
    if rs is not None and rs.rs is not None:
        yield rs.flush()


def load_audio(path: str | Path, max_seconds: float = 600.0) -> np.ndarray:
    """Read an audio file (WAV, FLAC, OGG: ``soundfile``), mix to mono, resample to 16 kHz.

    Returns float32 ``(samples,)`` in [-1, 1].

    Raises:
        DataError: missing or unreadable file, no samples, or longer than ``max_seconds`` (the message
            says what to do).
    """
    import soundfile as sf

    info = check_audio_file(path)
    if info.frames / info.samplerate > max_seconds:
        raise DataError(f"audio file {path} is {info.frames / info.samplerate:.0f} s long, over the {max_seconds:.0f} s "
                        "limit; split it or use --stream")
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if not np.all(np.isfinite(x)):
        raise DataError(f"audio file {path} holds NaN or infinite samples")
    return resample(x, int(sr), SAMPLE_RATE)
