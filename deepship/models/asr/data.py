"""Speech data for the streaming ASR model: synthesized with espeak-ng, noised, featurized with kaldi-native-fbank.

No speech corpus ships offline, so the corpus is synthesized (seeded, cached):

- **sentences**: several hundred distinct everyday sentences and voice-assistant commands, generated
  from templates (:func:`sentences`); the held-out test sentences never occur in training;
- **voices**: Debian's ``espeak-ng`` (``apt-get install -y espeak-ng``) with 7 English accents
  (:data:`ACCENTS`) and voice variants, speed 130-210 words/min, pitch 25-75. Test voices use
  variants (:data:`TEST_VARIANTS`) that never occur in training;
- **noise**: additive white, pink or brown noise at 0-20 dB SNR on most training utterances; the test
  set has a clean copy (the CER bar) and a copy at 10 dB SNR;
- **features**: 80-dim log-mel filterbank, 25 ms window, 10 ms shift, computed with
  ``kaldi_native_fbank.OnlineFbank`` (:func:`fbank`), which is also what the streaming runner and the
  deployment bundle use, so training, export and deployment see identical features.

Audio is 16 kHz mono float32 in [-1, 1]; espeak-ng's 22.05 kHz output is resampled with ``soxr``.
"""
from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataError
from ...utils import atomic_file, cache_root, first_line, stable_hash

SAMPLE_RATE = 16000
N_MELS = 80
FRAME_SHIFT_MS = 10
FRAME_LENGTH_MS = 25
#: espeak-ng English accents (``espeak-ng --voices=en``)
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029"]
#: voice variants heard in training, and the held-out ones heard only in the test set
TRAIN_VARIANTS = ["m1", "m2", "m3", "m4", "m6", "m8", "f1", "f2", "f4", "klatt", "klatt3", "david", "john", "Andy"]
TEST_VARIANTS = ["m7", "f3", "f5", "klatt2", "Annie", "edward"]
#: characters of the CTC vocabulary (index 0 is the blank)
CHARS = " abcdefghijklmnopqrstuvwxyz'"
VOCAB = ["<blk>"] + list(CHARS)

SPEECH_VERSION = 1


def _words_for_number(n: int) -> str:
    ones = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
           "sixteen seventeen eighteen nineteen".split()
    tens = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
    if n < 20:
        return ones[n]
    return tens[n // 10] + ("" if n % 10 == 0 else " " + ones[n % 10])


_NAMES = "anna ben carla david emma frank grace henry isabel jack kate liam maria noah olivia peter rosa sam tom " \
         "victor".split()
_ROOMS = ["kitchen", "bedroom", "living room", "bathroom", "garage", "office", "hallway", "garden"]
_DEVICES = ["lights", "heating", "fan", "radio", "television", "coffee machine", "alarm", "music"]
_WHEN = ["today", "tomorrow", "tonight", "this morning", "this evening", "on monday", "on friday",
         "at the weekend", "next week", "after lunch"]
_PLACES = ["station", "library", "market", "park", "doctor", "bakery", "school", "museum", "beach", "post office"]
_FOODS = ["bread", "milk", "apples", "cheese", "coffee", "tea", "rice", "eggs", "oranges", "soup"]
_ADJ = ["quiet", "busy", "small", "old", "bright", "cold", "warm", "green", "long", "lovely"]
_THINGS = ["window", "door", "letter", "book", "bicycle", "umbrella", "jacket", "phone", "key", "bag"]

_TEMPLATES = [
    lambda r: f"turn {r.choice(['on', 'off'])} the {r.choice(_ROOMS)} {r.choice(_DEVICES)}",
    lambda r: f"set a timer for {_words_for_number(int(r.integers(2, 60)))} minutes",
    lambda r: f"wake me up at {_words_for_number(int(r.integers(1, 13)))} {r.choice(['thirty', 'fifteen', 'oclock'])}",
    lambda r: f"call {r.choice(_NAMES)} {r.choice(['now', 'later', 'on the mobile', 'at home', 'back'])}",
    lambda r: f"what is the weather like {r.choice(_WHEN)}",
    lambda r: f"remind me to buy {r.choice(_FOODS)} {r.choice(_WHEN)}",
    lambda r: f"{r.choice(['turn up', 'turn down', 'mute', 'pause', 'resume'])} the {r.choice(['volume', 'music', 'radio', 'podcast'])}",
    lambda r: f"how do i get to the {r.choice(_PLACES)} from here",
    lambda r: f"send a message to {r.choice(_NAMES)} saying i will be "
              f"{r.choice(['late', 'early', 'home soon', 'there at ' + _words_for_number(int(r.integers(1, 13)))])}",
    lambda r: f"{r.choice(_NAMES)} is going to the {r.choice(_PLACES)} {r.choice(_WHEN)}",
    lambda r: f"could you please close the {r.choice(_THINGS)}",
    lambda r: f"i would like {r.choice(['a cup of', 'some more', 'a little'])} {r.choice(_FOODS)} please",
    lambda r: f"the {r.choice(_ADJ)} {r.choice(_THINGS)} is in the {r.choice(_ROOMS)}",
    lambda r: f"have you seen my {r.choice(_THINGS)} {r.choice(['anywhere', 'today', 'in the ' + r.choice(_ROOMS)])}",
    lambda r: f"we need {_words_for_number(int(r.integers(2, 13)))} {r.choice(_FOODS)} for {r.choice(['dinner', 'the party', 'breakfast', 'the weekend'])}",
    lambda r: f"the {r.choice(_PLACES)} opens at {_words_for_number(int(r.integers(6, 12)))} {r.choice(_WHEN)}",
    lambda r: f"it is {r.choice(_ADJ)} in the {r.choice(_ROOMS)} {r.choice(_WHEN)}",
    lambda r: f"{r.choice(['please', 'can you'])} {r.choice(['repeat that', 'speak slower', 'say that again', 'help me'])}",
    lambda r: f"my {r.choice(['sister', 'brother', 'friend', 'neighbour', 'doctor'])} {r.choice(_NAMES)} lives near the {r.choice(_PLACES)}",
    lambda r: f"let us meet at the {r.choice(_PLACES)} at {_words_for_number(int(r.integers(1, 13)))} {r.choice(_WHEN)}",
]


def sentences(n: int = 600, seed: int = 0) -> list[str]:
    """``n`` distinct lower-case sentences over :data:`CHARS`, generated from templates (seeded)."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        s = " ".join(_TEMPLATES[int(rng.integers(len(_TEMPLATES)))](rng).split())
        if s not in seen and all(c in CHARS for c in s):
            seen.add(s)
            out.append(s)
    return out


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """Speak ``text`` with espeak-ng; float32 ``(samples,)`` at 16 kHz in [-1, 1].

    Raises:
        DataError: espeak-ng is not installed or fails.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("espeak-ng is not installed; run apt-get install -y espeak-ng (make install does it)")
    p = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                       capture_output=True, timeout=60)
    if p.returncode != 0 or len(p.stdout) <= 44:
        raise DataError(f"espeak-ng failed for voice {voice}: {p.stderr.decode(errors='replace')[:120]}")
    # espeak-ng's --stdout WAV header carries no valid length: PCM s16le mono 22050 Hz after 44 bytes
    pcm = np.frombuffer(p.stdout[44:len(p.stdout) - (len(p.stdout) - 44) % 2], dtype="<i2").astype(np.float32) / 32768
    return resample(pcm, 22050, SAMPLE_RATE)


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample float32 mono audio with ``soxr`` (high quality); a no-op when the rates agree."""
    if sr_in == sr_out:
        return np.asarray(x, np.float32)
    import soxr

    return soxr.resample(np.asarray(x, np.float32), sr_in, sr_out).astype(np.float32)


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


@dataclass
class SpeechCorpus:
    """Train and held-out sets (test voices and sentences unseen in training); waveforms of the
    clean test set are kept for streaming measurements (``test_audio``)."""

    train: SpeechSet
    test: SpeechSet  # held-out voices and sentences, clean
    test_noisy: SpeechSet  # the same utterances at 10 dB SNR
    test_audio: list[np.ndarray]
    recipe: dict


DEFAULT_RECIPE = {"sentences": 600, "test_sentences": 100, "train_renditions": 5, "test_renditions": 2,
                  "clean_fraction": 0.3, "snr_db": [0.0, 20.0], "test_snr_db": 10.0, "seed": 0}


def _render(jobs: list[tuple], workers: int = 4) -> list[np.ndarray]:
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda j: synthesize(*j), jobs))


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
    """The synthesized corpus for ``recipe`` (default :data:`DEFAULT_RECIPE`), from the cache or built
    now (about 70 s on 2 cores for the default: 2,500 training and 200 + 200 test utterances).
    A file lock makes parallel processes build it once.

    Raises:
        DataError: espeak-ng is missing (the message says how to install it).
    """
    r = {**DEFAULT_RECIPE, **(recipe or {})}
    key = stable_hash({"speech": r, "v": SPEECH_VERSION, "train": TRAIN_VARIANTS, "test": TEST_VARIANTS})
    path = speech_cache() / f"corpus-{key}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:  # parallel processes (test workers) build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _load_or_build(path, r, progress)


def _load_or_build(path: Path, r: dict, progress) -> SpeechCorpus:
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                audio_lens = z["audio_lens"]
                off = np.concatenate([[0], np.cumsum(audio_lens)])
                audio = z["audio"].astype(np.float32) / 32767
                return SpeechCorpus(_unpack(z, "train_"), _unpack(z, "test_"), _unpack(z, "noisy_"),
                                    [audio[off[i]:off[i + 1]] for i in range(len(audio_lens))], r)
        except Exception:  # a corrupt cache entry is rebuilt
            path.unlink(missing_ok=True)
    if progress:
        progress("synthesizing the speech corpus with espeak-ng (cached afterwards)")
    rng = np.random.default_rng(int(r["seed"]))
    sents = sentences(int(r["sentences"]), int(r["seed"]))
    n_test = int(r["test_sentences"])
    train_s, test_s = sents[n_test:], sents[:n_test]

    def jobs(sl, variants, reps):
        out = []
        for s in sl:
            for _ in range(reps):
                v = f"{rng.choice(ACCENTS)}+{rng.choice(variants)}"
                out.append((s, v, int(rng.integers(130, 211)), int(rng.integers(25, 76))))
        return out

    tr_jobs = jobs(train_s, TRAIN_VARIANTS, int(r["train_renditions"]))
    te_jobs = jobs(test_s, TEST_VARIANTS, int(r["test_renditions"]))
    tr_audio = _render(tr_jobs)
    te_audio = _render(te_jobs)
    lo, hi = r["snr_db"]
    tr_snr = np.where(rng.random(len(tr_jobs)) < float(r["clean_fraction"]), np.inf,
                      rng.uniform(float(lo), float(hi), len(tr_jobs)))
    tr_feats = [fbank(a if np.isinf(s) else add_noise(a, float(s), rng)) for a, s in zip(tr_audio, tr_snr)]
    te_feats = [fbank(a) for a in te_audio]
    te_noisy = [fbank(add_noise(a, float(r["test_snr_db"]), rng)) for a in te_audio]

    def mk(feats, js, audio, snr):
        return SpeechSet(feats, [j[0] for j in js], [j[1] for j in js], np.asarray(snr, np.float64),
                         np.array([len(a) / SAMPLE_RATE for a in audio]))

    train = mk(tr_feats, tr_jobs, tr_audio, tr_snr)
    test = mk(te_feats, te_jobs, te_audio, np.full(len(te_jobs), np.inf))
    noisy = mk(te_noisy, te_jobs, te_audio, np.full(len(te_jobs), float(r["test_snr_db"])))
    arrays = {**{"train_" + k: v for k, v in _pack(train).items()}, **{"test_" + k: v for k, v in _pack(test).items()},
              **{"noisy_" + k: v for k, v in _pack(noisy).items()},
              "audio": (np.concatenate(te_audio).clip(-1, 1) * 32767).astype(np.int16),
              "audio_lens": np.array([len(a) for a in te_audio], np.int64)}
    with atomic_file(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return SpeechCorpus(train, test, noisy, te_audio, r)


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
