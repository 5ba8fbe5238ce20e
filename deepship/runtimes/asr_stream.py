"""Streaming CTC speech recognition over an exported chunk model: fbank, state, decoding.

This file needs only ``numpy`` and ``kaldi_native_fbank`` (plus ``onnxruntime`` for
:func:`open_model`): ``optimize asr bundle`` copies it unchanged into the deployment bundle as its
runner, and deepship uses the same file (one implementation). The model is any object with
``run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]`` taking the chunk-step inputs
(``x``, ``sub_cache``, ``att_cache``, ``conv_cache``, ``lstm_h``, ``lstm_c``) and returning
``log_probs`` and the ``next_*`` states (see ``deepship/models/asr/``): an ONNX Runtime session
(:class:`OrtModel`) or deepship's torch/ORT ``Session``.

Streaming (:class:`Stream`): ``accept_waveform(samples, sample_rate)`` feeds audio of any rate (16 kHz
expected; other rates are resampled by linear interpolation here, or better by the caller with
soxr); the fbank runs online (``kaldi_native_fbank.OnlineFbank``); every complete chunk of
``chunk_frames`` frames runs the model at once and greedy CTC extends the partial result;
``finalize()`` flushes the last frames (padded with the feature mean) and returns the final text,
optionally re-decoded with the CTC prefix beam search over the whole utterance's log-probs (kept
for that: 29 floats per 40 ms). A silence gate returns "" for audio that never exceeds -50 dBFS.
The fbank's consumed frames are released as the stream goes, so memory stays bounded.

Continuous use (:class:`Endpointer`): an energy voice-activity detector splits an endless stream at
pauses and emits a final transcript per utterance, each from a fresh :class:`Stream`.

Decoding: greedy CTC (collapse repeats, drop blanks) and the CTC prefix beam search (Graves 2012,
"Sequence Transduction with Recurrent Neural Networks"; Hannun et al. 2014, "First-Pass Large
Vocabulary Continuous Speech Recognition using Bi-Directional Recurrent DNNs"), optionally fused with a
character n-gram language model (:class:`CharLM`, Witten-Bell smoothing).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

STATE_NAMES = ["sub_cache", "att_cache", "conv_cache", "lstm_h", "lstm_c"]
#: silence gate: a stream whose samples never exceed this peak (-50 dBFS) has an empty transcript
#: (the model was never trained on digital silence and may hallucinate a few letters on it)
SILENCE_PEAK = 10 ** (-50 / 20)


class FeatureConfig:
    """The feature and streaming configuration saved next to the model (``features.json``).

    Attributes:
        sample_rate (Hz), n_mels, frame_length_ms, frame_shift_ms: the fbank;
        chunk_frames: fbank frames per model call; mean: float32 ``(n_mels,)`` (pads the last chunk);
        state_shapes: per state input, its shape without the batch axis; tokens: the CTC vocabulary
        (index 0 = blank).
    """

    def __init__(self, d: Mapping[str, Any]):
        self.sample_rate = int(d["sample_rate"])
        self.n_mels = int(d["n_mels"])
        self.frame_length_ms = float(d["frame_length_ms"])
        self.frame_shift_ms = float(d["frame_shift_ms"])
        self.chunk_frames = int(d["chunk_frames"])
        self.mean = np.asarray(d["mean"], np.float32)
        self.state_shapes = {k: tuple(v) for k, v in d["state_shapes"].items()}
        self.tokens = list(d["tokens"])
        self.raw = dict(d)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureConfig":
        return cls(json.loads(Path(path).read_text()))

    def fbank_options(self):
        import kaldi_native_fbank as knf

        o = knf.FbankOptions()
        o.frame_opts.samp_freq = self.sample_rate
        o.frame_opts.dither = 0.0
        o.frame_opts.snip_edges = False
        o.frame_opts.frame_length_ms = self.frame_length_ms
        o.frame_opts.frame_shift_ms = self.frame_shift_ms
        o.mel_opts.num_bins = self.n_mels
        return o

    def initial_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {k: np.zeros((batch,) + s, np.float32) for k, s in self.state_shapes.items()}


class OrtModel:
    """An ONNX Runtime session of the chunk model (CPU, ``threads`` intra-op threads)."""

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, dict(feeds))))


def open_model(path: str | Path, threads: int = 1) -> OrtModel:
    return OrtModel(path, threads)


# ---- CTC decoding -------------------------------------------------------------------------------

def ctc_greedy(log_probs: np.ndarray, prev: int = 0) -> tuple[list[int], int]:
    """Greedy CTC over ``(frames, vocab)`` log-probs: argmax, collapse repeats, drop blanks (0).

    ``prev`` is the last frame's argmax of the previous call (streaming); returns ``(labels, last)``.
    """
    out = []
    for a in np.asarray(log_probs).argmax(-1).tolist():
        if a != prev and a != 0:
            out.append(int(a))
        prev = a
    return out, prev


class CharLM:
    """A character n-gram language model over the CTC tokens, for :func:`ctc_prefix_beam_search`.

    Interpolated Witten-Bell smoothing (Witten and Bell 1991; the form in Chen and Goodman 1998):
    ``P(c | h) = (C(h c) + T(h) P(c | h')) / (C(h) + T(h))``, ``T(h)`` the number of distinct characters
    seen after ``h``, ``h'`` the context without its oldest character, add-one unigrams at the bottom.
    Every seen context of 0 to ``order - 1`` characters stores its whole distribution (natural log,
    quantized to 0.05), so a lookup is one dictionary access on the longest seen suffix. An utterance
    starts after spaces. Built from text in a few seconds (:meth:`build`), saved as ``.npz`` (numpy only).
    """

    def __init__(self, order: int, chars: str, contexts: list[str], logp: np.ndarray):
        self.order, self.chars = int(order), chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.table = {ctx: logp[i] for i, ctx in enumerate(contexts)}

    @classmethod
    def build(cls, texts, chars: str, order: int = 4) -> "CharLM":
        """Count ``texts`` (strings over ``chars``) and smooth; characters outside ``chars`` are dropped."""
        from collections import defaultdict

        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for t in texts:
            t = " " * (order - 1) + "".join(c for c in t if c in chars).strip()
            for i in range(order - 1, len(t)):
                for k in range(order):
                    counts[t[i - k:i]][t[i]] += 1
        V = len(chars)
        dists: dict[str, np.ndarray] = {}
        for ctx in sorted(counts, key=len):
            c = counts[ctx]
            vec = np.array([c.get(ch, 0) for ch in chars], np.float64)
            n, types = vec.sum(), float((vec > 0).sum())
            lower = dists[ctx[1:]] if ctx else np.full(V, 1.0 / V)
            dists[ctx] = (vec + types * lower) / (n + types) if n else lower
        ctxs = sorted(dists)
        logp = np.stack([np.log(dists[c]) for c in ctxs])
        q = np.clip(np.round(-logp / 0.05), 0, 255).astype(np.uint8)
        return cls(order, chars, ctxs, q.astype(np.float32) * -0.05)

    def logp(self, history: str, ch: str) -> float:
        """``log P(ch | the last order - 1 characters of history)`` (history padded with spaces)."""
        h = (" " * (self.order - 1) + history)[-(self.order - 1):] if self.order > 1 else ""
        while h not in self.table:
            h = h[1:]
        return float(self.table[h][self.index[ch]])

    def save(self, path: str | Path) -> None:
        ctxs = sorted(self.table)
        q = np.stack([np.round(-self.table[c] / 0.05) for c in ctxs]).astype(np.uint8)
        with open(path, "wb") as fh:
            np.savez_compressed(fh, order=self.order, chars=np.array(self.chars), contexts=np.array(ctxs), logp_q=q)

    @classmethod
    def load(cls, path: str | Path) -> "CharLM":
        with np.load(path, allow_pickle=False) as z:
            return cls(int(z["order"]), str(z["chars"]), [str(c) for c in z["contexts"]], z["logp_q"].astype(np.float32) * -0.05)


def ctc_prefix_beam_search(log_probs: np.ndarray, beam: int = 8, prune: float = -12.0, lm: CharLM | None = None,
                           tokens: list[str] | None = None, alpha: float = 0.5, beta: float = 1.0) -> list[int]:
    """CTC prefix beam search over ``(frames, vocab)`` log-probs (natural log); returns the best label
    sequence. Per prefix it keeps the log-probability of ending in blank and in non-blank; symbols
    with log-prob below ``prune`` at a frame are skipped.

    With ``lm`` (a :class:`CharLM`; ``tokens`` maps labels to characters) prefixes are ranked by
    ``log P_ctc + alpha log P_lm + beta |prefix|`` (shallow fusion, Hannun et al. 2014)."""
    NEG = -math.inf

    def lse(*xs: float) -> float:
        m = max(xs)
        return m if m == NEG else m + math.log(sum(math.exp(x - m) for x in xs))

    lm_score: dict[tuple, float] = {(): 0.0}

    def fused(prefix: tuple) -> float:
        if lm is None:
            return 0.0
        if prefix not in lm_score:
            hist = "".join(tokens[i] for i in prefix[-lm.order:-1])
            lm_score[prefix] = fused(prefix[:-1]) + alpha * lm.logp(hist, tokens[prefix[-1]]) + beta
        return lm_score[prefix]

    beams: dict[tuple, tuple[float, float]] = {(): (0.0, NEG)}  # prefix -> (p_blank, p_nonblank)
    for lp in np.asarray(log_probs, np.float64):
        nxt: dict[tuple, list[float]] = {}

        def add(prefix, pb, pnb):
            cur = nxt.setdefault(prefix, [NEG, NEG])
            cur[0], cur[1] = lse(cur[0], pb), lse(cur[1], pnb)

        cand = [int(s) for s in np.nonzero(lp >= prune)[0]] or [int(lp.argmax())]
        for prefix, (pb, pnb) in beams.items():
            total = lse(pb, pnb)
            for s in cand:
                p = float(lp[s])
                if s == 0:
                    add(prefix, total + p, NEG)
                    continue
                last = prefix[-1] if prefix else None
                ext = prefix + (s,)
                if s == last:
                    add(ext, NEG, pb + p)  # a repeat needs a blank in between
                    add(prefix, NEG, pnb + p)  # or collapses into the same symbol
                else:
                    add(ext, NEG, total + p)
        beams = dict(sorted(((k, (v[0], v[1])) for k, v in nxt.items()), key=lambda kv: -(lse(*kv[1]) + fused(kv[0])))[:beam])
    return list(max(beams.items(), key=lambda kv: lse(*kv[1]) + fused(kv[0]))[0])


def check_samples(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """``samples`` as float32 ``(n,)``.

    Raises:
        ValueError: non-mono or non-finite samples, or a non-positive ``sample_rate``.
    """
    x = np.asarray(samples, np.float32)
    if x.ndim != 1:
        raise ValueError(f"samples must be mono, shape (n,); got shape {x.shape} (average the channels)")
    if int(sample_rate) <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples hold NaN or infinite values")
    return x


def _resample_linear(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out or len(x) == 0:
        return x
    n = int(round(len(x) * sr_out / sr_in))
    return np.interp(np.arange(n) * (sr_in / sr_out), np.arange(len(x)), x).astype(np.float32)


class Stream:
    """One utterance streamed through the chunk model (one state per stream).

    Args:
        model: ``run(feeds) -> outputs`` over the chunk-step graph (batch 1).
        config: the :class:`FeatureConfig`.
        resampler: optional ``(samples, sr_in, sr_out) -> samples`` for rates other than 16 kHz
            (default: linear interpolation, which deepship replaces by soxr).

    ``chunk_latencies_ms`` records the compute time of every model call (ms).
    """

    def __init__(self, model: Any, config: FeatureConfig, resampler=None):
        import kaldi_native_fbank as knf

        self.model = model
        self.cfg = config
        self.resampler = resampler or _resample_linear
        self.fbank = knf.OnlineFbank(config.fbank_options())
        self.state = config.initial_state(1)
        self.frames_used = 0
        self.pending: list[np.ndarray] = []
        self.labels: list[int] = []
        self.log_probs: list[np.ndarray] = []
        self._prev = 0
        self.finished = False
        self.samples = 0
        self.chunk_latencies_ms: list[float] = []
        self.heard = False  # silence gate: any sample above SILENCE_PEAK yet?

    def accept_waveform(self, samples: np.ndarray, sample_rate: int) -> None:
        """Feed mono audio (float32 in [-1, 1], any length, ``sample_rate`` Hz); runs every complete chunk.

        Raises:
            ValueError: after :meth:`finalize`, for non-mono or non-finite samples, or a non-positive rate.
        """
        if self.finished:
            raise ValueError("this stream is finalized; create a new Stream for the next utterance")
        x = check_samples(samples, sample_rate)
        if len(x) == 0:
            return
        x = self.resampler(x, int(sample_rate), self.cfg.sample_rate)
        self.samples += len(x)
        if not self.heard and len(x) and float(np.abs(x).max()) > SILENCE_PEAK:
            self.heard = True
        self.fbank.accept_waveform(self.cfg.sample_rate, x.tolist())
        self._drain(final=False)

    def _drain(self, final: bool) -> None:
        ready = self.fbank.num_frames_ready  # frame indices are absolute, also after pop()
        first = self.frames_used
        while self.frames_used < ready:
            # copy: get_frame returns a view of memory that pop() frees
            self.pending.append(np.array(self.fbank.get_frame(self.frames_used), np.float32, copy=True))
            self.frames_used += 1
        if self.frames_used > first:
            self.fbank.pop(self.frames_used - first)  # memory stays bounded on endless streams
        n = self.cfg.chunk_frames
        while len(self.pending) >= n or (final and self.pending):
            chunk = self.pending[:n]
            self.pending = self.pending[n:]
            x = np.stack(chunk)
            if len(x) < n:
                x = np.concatenate([x, np.broadcast_to(self.cfg.mean, (n - len(x), self.cfg.n_mels))])
            self._run(x[None].astype(np.float32))

    def _run(self, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        out = self.model.run({"x": x, **self.state})
        self.chunk_latencies_ms.append((time.perf_counter() - t0) * 1e3)
        self.state = {k: out["next_" + k] for k in STATE_NAMES}
        lp = np.asarray(out["log_probs"])[0]
        self.log_probs.append(lp)
        new, self._prev = ctc_greedy(lp, self._prev)
        self.labels.extend(new)

    def text_of(self, labels) -> str:
        return "".join(self.cfg.tokens[i] for i in labels if 0 < i < len(self.cfg.tokens)).strip()

    def partial_result(self) -> str:
        """The greedy transcript so far ("" while the audio has stayed below the silence gate)."""
        return self.text_of(self.labels) if self.heard else ""

    def finalize(self, beam: int = 0, lm: CharLM | None = None) -> str:
        """Flush the remaining audio and return the final transcript (greedy, or the prefix beam search
        with ``beam`` > 1, fused with the character LM ``lm`` if given). The stream accepts no more audio
        afterwards."""
        if not self.finished:
            self.fbank.input_finished()
            self._drain(final=True)
            self.finished = True
        if beam > 1 and self.log_probs and self.heard:
            return self.text_of(ctc_prefix_beam_search(np.concatenate(self.log_probs), beam, lm=lm, tokens=self.cfg.tokens))
        return self.partial_result()

    @property
    def audio_seconds(self) -> float:
        return self.samples / self.cfg.sample_rate


class Endpointer:
    """Continuous recognition for hours of audio: an energy voice-activity detector cuts the stream at
    pauses, each utterance runs through its own :class:`Stream` and is finalized at its endpoint.

    Voice activity (per 10 ms frame): the frame's RMS level in dBFS is compared with a noise floor that
    follows the quietest recent frames (it starts at the first frame's level, at most ``min_level_db +
    margin_db``, drops at once to a quieter frame and rises by ``floor_rise_db`` per second); a frame is speech when it is ``margin_db`` above the floor and above ``min_level_db``.
    An utterance starts at the first speech frame (with ``pre_roll_ms`` of the audio before it, so the
    onset is not cut) and ends after ``min_silence_ms`` without speech, or at ``max_utterance_s``. These
    are the usual endpoint rules of streaming recognizers (Kaldi's and sherpa-onnx's trailing-silence rule),
    with the silence measured on the audio instead of decoded blanks. Between utterances the model does
    not run, and every utterance starts from a fresh state, so memory and drift stay bounded however
    long the stream is.

    ``accept_waveform`` returns the utterances that ended in that piece, each
    ``{"text", "start_s", "end_s"}`` (seconds from the start of the stream); utterances whose transcript
    is empty (a cough, a door) are dropped. ``finalize()`` ends the last one. ``beam`` and ``lm`` are
    the final decoding of each utterance (:meth:`Stream.finalize`).
    """

    def __init__(self, model: Any, config: FeatureConfig, resampler=None, min_silence_ms: float = 500.0,
                 min_speech_ms: float = 100.0, margin_db: float = 12.0, min_level_db: float = -55.0,
                 floor_rise_db: float = 3.0, pre_roll_ms: float = 200.0, max_utterance_s: float = 20.0, beam: int = 0,
                 lm: CharLM | None = None):
        self.model, self.cfg, self.beam, self.lm = model, config, beam, lm
        self.resampler = resampler or _resample_linear
        sr = config.sample_rate
        self.frame = sr // 100
        self.min_silence = int(min_silence_ms / 10)
        self.min_speech = max(1, int(min_speech_ms / 10))
        self.margin, self.min_level, self.rise = margin_db, min_level_db, floor_rise_db / 100
        self.pre_roll = int(pre_roll_ms / 10)
        self.max_frames = int(max_utterance_s * 100)
        self.floor: float | None = None
        self.buf = np.zeros(0, np.float32)  # samples not yet framed
        self.history: list[np.ndarray] = []  # the last pre_roll frames, while idle
        self.stream: Stream | None = None
        self.n = 0  # frames seen
        self.start = 0
        self.speech_frames = 0
        self.silence_run = 0
        self.segments: list[dict] = []
        self.chunks = 0  # model calls so far (the model runs only inside utterances)

    def _level(self, f: np.ndarray) -> float:
        return 10 * math.log10(float(np.mean(f.astype(np.float64) ** 2)) + 1e-12)

    def accept_waveform(self, samples: np.ndarray, sample_rate: int) -> list[dict]:
        """Feed mono float32 audio of any length at ``sample_rate`` Hz; returns the utterances it ended.

        Raises:
            ValueError: non-mono or non-finite samples, or a non-positive rate (as :meth:`Stream.accept_waveform`).
        """
        x = check_samples(samples, sample_rate)
        self.buf = np.concatenate([self.buf, self.resampler(x, int(sample_rate), self.cfg.sample_rate)])
        done = []
        k = len(self.buf) // self.frame
        for i in range(k):
            r = self._frame(self.buf[i * self.frame:(i + 1) * self.frame])
            if r is not None:
                done.append(r)
        self.buf = self.buf[k * self.frame:]
        return done

    def _frame(self, f: np.ndarray) -> dict | None:
        lvl = self._level(f)
        if self.floor is None:  # a stream may open on speech: the floor starts no higher than quiet-room level
            self.floor = min(lvl, self.min_level + self.margin)
        self.floor = lvl if lvl < self.floor else self.floor + self.rise
        speech = lvl > self.min_level and lvl > self.floor + self.margin
        self.n += 1
        if self.stream is None:
            self.history = (self.history + [f])[-(self.pre_roll + 1):]
            if not speech:
                return None
            self.stream = Stream(self.model, self.cfg)
            self.start = self.n - len(self.history)
            self.speech_frames, self.silence_run = 0, 0
            self.stream.accept_waveform(np.concatenate(self.history), self.cfg.sample_rate)
            self.history = []
        else:
            self.stream.accept_waveform(f, self.cfg.sample_rate)
        self.speech_frames += speech
        self.silence_run = 0 if speech else self.silence_run + 1
        if self.silence_run >= self.min_silence or self.n - self.start >= self.max_frames:
            return self._end()
        return None

    def _end(self) -> dict | None:
        st, self.stream = self.stream, None
        if st is None:
            return None
        text = st.finalize(self.beam, self.lm)
        self.chunks += len(st.chunk_latencies_ms)
        seg = {"text": text, "start_s": round(self.start / 100, 2), "end_s": round((self.n - self.silence_run) / 100, 2)}
        if not text or self.speech_frames < self.min_speech:
            return None
        self.segments.append(seg)
        return seg

    def partial_result(self) -> str:
        """The current utterance's greedy transcript so far ("" between utterances)."""
        return self.stream.partial_result() if self.stream is not None else ""

    def finalize(self) -> list[dict]:
        """End the stream: the last utterance, if one is open (a list of zero or one segment)."""
        if self.stream is not None and len(self.buf):
            self.stream.accept_waveform(self.buf, self.cfg.sample_rate)
        self.buf = np.zeros(0, np.float32)
        seg = self._end()
        return [seg] if seg else []


def transcribe(model: Any, config: FeatureConfig, samples: np.ndarray, sample_rate: int, chunk_samples: int = 0,
               beam: int = 0, resampler=None) -> str:
    """Transcribe a whole waveform by streaming it (``chunk_samples`` per feed; 0 = all at once)."""
    s = Stream(model, config, resampler)
    step = chunk_samples or max(len(samples), 1)
    for i in range(0, len(samples), step):
        s.accept_waveform(samples[i:i + step], sample_rate)
    return s.finalize(beam)


if __name__ == "__main__":  # the bundle's command line: python asr_stream.py model.onnx features.json file.wav
    import sys
    import wave

    if len(sys.argv) != 4:
        sys.exit("usage: python asr_stream.py MODEL.onnx features.json FILE.wav (16-bit PCM WAV)")
    try:
        with wave.open(sys.argv[3]) as w:
            if w.getsampwidth() != 2:
                sys.exit(f"{sys.argv[3]}: only 16-bit PCM WAV is read here; convert it (e.g. sox in.wav -b 16 out.wav)")
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
            pcm = pcm.reshape(-1, w.getnchannels()).mean(1)
            rate = w.getframerate()
    except (wave.Error, EOFError, OSError) as e:  # not a WAV, truncated, missing, a folder
        sys.exit(f"{sys.argv[3]}: not a readable 16-bit PCM WAV file ({type(e).__name__}: {str(e)[:80]}); "
                 "convert it, e.g. sox in.mp3 -b 16 -r 16000 out.wav")
    if not pcm.size:
        sys.exit(f"{sys.argv[3]}: the WAV file holds no samples")
    try:
        model, cfg = open_model(sys.argv[1]), FeatureConfig.load(sys.argv[2])
    except Exception as e:  # the bundle's own files: missing or corrupt
        sys.exit(f"cannot load the recognizer ({type(e).__name__}: {str(e)[:120]}); give the bundle's model.onnx "
                 "and features.json")
    print(transcribe(model, cfg, pcm, rate, chunk_samples=rate // 10))
