"""The ASR family's adapter: the recognizer's report rows, its streaming evaluation (CER, WER, CER at
10 dB, on unseen-synthesizer speech and on isolated unseen words), the character LM of its beam
search, and its streaming measures (real-time factor on 1 thread, per-chunk p50/p99 latency,
algorithmic latency, the bundle runner's peak RSS).

Evaluation streams whole held-out utterances chunk by chunk through a variant's session with the
states carried (:func:`deepship.models.asr.stream_batch`), decodes greedy CTC
(:func:`deepship.runtimes.asr_stream.ctc_greedy`) and scores with ``jiwer``.
"""
from __future__ import annotations

import functools
import json
import time
import weakref
from typing import Any

import numpy as np
import torch

from ...models.asr import DEFAULT, RECIPE, corpus, feature_config, feature_mean, stream_batch
from ...models.asr import data as S
from ...models.asr.text import text_plan
from ...models.spec import ModelSpec
from ...runtimes import asr_stream
from ...runtimes.asr_stream import CharLM, FeatureConfig, Stream, ctc_greedy
from ..adapters import ArchAdapter, register_adapter
from ..context import ModelContext
from ..variants import Variant

#: short names accepted for the recognizer's variants (``optimize asr ... --variant``)
VARIANT_ALIASES = {"torch": "fp32-torch", "fp32": "fp32-onnx", "onnx": "fp32-onnx", "int8": "int8-dynamic"}


def plan(spec: ModelSpec, default_plan: list) -> list:
    """The recognizer's report rows: FP32 torch (baseline), FP32 ONNX, INT8 dynamic, INT8 static QDQ
    (per-channel, MinMax calibration on chunks recorded from real training utterances with their states)."""
    return [("fp32-onnx", "export", "onnx", {}, "fp32-torch"),
            ("int8-dynamic", "quantize", "int8-dynamic", {}, "fp32-onnx"),
            ("int8-static", "quantize", "int8-static", {"calibration": "minmax", "per_channel": True}, "fp32-onnx")]


def asr_variant(ctx: ModelContext, variant: str) -> Variant:
    """Build (or reuse) a variant of the ``asr`` model: ``fp32-torch``, ``fp32-onnx``, ``int8-dynamic``,
    ``int8-static`` (aliases ``torch``, ``fp32``, ``onnx``, ``int8`` = ``int8-dynamic``).

    Raises:
        StageError: an unknown variant name.
    """
    return ctx.build_planned(VARIANT_ALIASES.get(variant, variant), plan(ctx.spec, []))


def greedy_text(log_probs: np.ndarray) -> str:
    """Greedy CTC transcript of ``(frames, vocab)`` log-probs."""
    return S.decode_labels(ctc_greedy(log_probs)[0]).strip()


def error_rates(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus CER and WER (``jiwer``), fractions."""
    import jiwer

    return {"cer": float(jiwer.cer(refs, hyps)), "wer": float(jiwer.wer(refs, hyps))}


#: per session, its :func:`evaluate_cer` results: the report's metric, its measurements and the bundle
#: all ask for the same streaming evaluation of the same session
_EVALUATED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def stream_config():
    """The :class:`deepship.runtimes.asr_stream.FeatureConfig` of the trained model (for a ``Stream``)."""
    return FeatureConfig(feature_config())


#: the README.md of ``optimize asr bundle`` (:func:`deepship.api.asr_bundle` fills it in)
BUNDLE_README = """# deepship streaming ASR bundle

A streaming speech recognizer for the edge: Conformer + LSTM + CTC over characters, {precision}
({variant}), {size_kb:.0f} KB. Built by `optimize asr bundle` from deepship's `asr` zoo model.

| file | what |
|---|---|
| `model.onnx` | the chunk-step graph: `x` (batch, {chunk_frames}, 80) fbank frames + states -> `log_probs` + next states |
| `features.json` | fbank settings (kaldi-native-fbank), chunk size, feature mean, state shapes, token table |
| `tokens.txt` | the CTC token table (`<blk>` = 0; `<space>` is the word separator) |
| `asr_stream.py` | the runner: needs only `onnxruntime`, `numpy`, `kaldi-native-fbank` |
| `lm.npz` | a character 4-gram language model (Witten-Bell) for the beam search, counted on the training text |

```bash
pip install onnxruntime numpy kaldi-native-fbank
python asr_stream.py model.onnx features.json speech.wav        # 16-bit PCM WAV, any rate, mono/stereo
```

```python
from asr_stream import CharLM, Endpointer, FeatureConfig, Stream, open_model

model, cfg = open_model("model.onnx", threads=1), FeatureConfig.load("features.json")
s = Stream(model, cfg)
for piece in microphone_pieces():            # float32 mono samples in [-1, 1]
    s.accept_waveform(piece, 16000)
    print(s.partial_result())
print(s.finalize())                          # greedy; s.finalize(beam=8, lm=CharLM.load("lm.npz")): beam + LM
```

Continuous use: `Endpointer(model, cfg)` splits an endless stream at pauses (energy VAD) and returns
each utterance's final transcript from `accept_waveform` as it ends.

Streaming: {chunk_ms:.0f} ms chunks, no lookahead; algorithmic latency {alg_ms:.0f} ms (chunk + fbank
window overhang). Each `Stream` owns one state (attention K/V cache, convolution cache, LSTM state).
Measured on the build machine (held-out voices): {measured}
"""


#: the report's test sets (:data:`deepship.models.asr.data.TEST_SETS`): column suffix -> corpus part
SET_COLUMNS = {"unseen_synth": "unseen_synth", "words": "words"}


def transcribe_set(session, part: str = "sentences", noisy: bool = False, limit: int | None = None) -> list[str]:
    """Greedy transcripts of a held-out set (``sentences``, its ``noisy`` copy, ``unseen_synth``, ``words``),
    streamed chunk by chunk through ``session``. Computed once per session and set."""
    memo = _EVALUATED.setdefault(session, {})
    key = ("hyps", part, noisy, limit)
    if key not in memo:
        c = corpus()
        s = c.test_noisy if noisy else c.sets[part]
        n = len(s) if limit is None else min(limit, len(s))
        lps = stream_batch(session.run, s.feats[:n], DEFAULT, feature_mean())
        memo[key] = [greedy_text(lp) for lp in lps]
    return list(memo[key])


def evaluate_cer(session, noisy: bool = False, limit: int | None = None, part: str = "sentences") -> dict[str, float]:
    """CER and WER (fractions) of greedy CTC on a held-out set (default: seen synthesizers' held-out
    sentences with unseen words; ``noisy``: the same at 10 dB SNR; ``part="unseen_synth"``: Flite, never
    heard in training; ``part="words"``: isolated unseen words), streamed through ``session``."""
    s = corpus().test_noisy if noisy else corpus().sets[part]
    hyps = transcribe_set(session, part, noisy, limit)
    return error_rates(hyps, s.texts[:len(hyps)])


def first_char_diversity(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """The share of distinct first characters among transcripts and among references (fractions of the
    set size), and their ratio: a recognizer that answers every word with the same opening ("cur...")
    has a ratio near 0; one that hears the words, near 1."""
    def share(ts):
        return len({t[:1] for t in ts if t}) / max(len(ts), 1)
    h, r = share(hyps), share(refs)
    return {"hyp": round(h, 4), "ref": round(r, 4), "ratio": round(h / r, 4) if r else 0.0}


#: order of the character LM of the beam search (4: 132 KB, character perplexity 5.6 on the held-out
#: sentences against 7.1 for order 3; order 5 is 4x the size for 5.3)
LM_ORDER = 4


@functools.lru_cache(maxsize=1)
def char_lm() -> CharLM:
    """The character n-gram LM of the beam search (:class:`deepship.runtimes.asr_stream.CharLM`), counted
    on the recognizer's training texts only (:func:`deepship.models.asr.text.text_plan` of its recipe)."""
    r = {**S.DEFAULT_RECIPE, **RECIPE["corpus"]}
    plan = text_plan(r["text"], r["test_text"], int(r["seed"]), int(r["max_words"]))
    return CharLM.build(plan["train"], S.CHARS, LM_ORDER)


#: held-out utterances streamed for the real-time factor and per-chunk latency (about 45 s of audio)
RTF_UTTERANCES = 20


def measure_streaming(ctx: Any, variant: Any, session: Any, utterances: int = RTF_UTTERANCES) -> dict:
    """The report's ASR columns for one variant (``ctx``: the ``asr`` ModelContext; ``session``: the
    variant's session).

    - ``wer`` and ``cer_noisy`` (10 dB SNR) over the held-out sentences (fractions); ``cer_unseen_synth``,
      ``wer_unseen_synth`` (Flite, never heard in training) and ``cer_words``, ``wer_words`` (isolated
      unseen words);
    - ``rtf_1thread``: compute time / audio time when streaming ``utterances`` held-out utterances in
      40 ms pieces through a fresh 1-thread session, fbank included (:class:`Stream`);
    - ``chunk_ms_p50``, ``chunk_ms_p99``: model compute per chunk (ms) in that run;
    - ``algorithmic_latency_ms``: chunk + fbank window overhang (no lookahead);
    - ``peak_rss_mb``: peak resident memory of a fresh runner process (the bundle's ``asr_stream.py``:
      onnxruntime + numpy + kaldi-native-fbank) transcribing one utterance (ONNX variants only).
    """
    out: dict[str, Any] = {}
    er = evaluate_cer(session)
    out["wer"] = round(er["wer"], 4)
    out["cer_noisy"] = round(evaluate_cer(session, noisy=True)["cer"], 4)
    for col, part in SET_COLUMNS.items():
        e = evaluate_cer(session, part=part)
        out[f"cer_{col}"], out[f"wer_{col}"] = round(e["cer"], 4), round(e["wer"], 4)
    c = corpus()
    fc = stream_config()
    prev_threads = torch.get_num_threads()
    one = ctx.session(variant, threads=1)
    piece = S.SAMPLE_RATE * 40 // 1000
    total, audio, lat = 0.0, 0.0, []
    for a in c.test_audio[:utterances]:
        st = Stream(one, fc)
        t0 = time.perf_counter()
        for i in range(0, len(a), piece):
            st.accept_waveform(a[i:i + piece], S.SAMPLE_RATE)
        st.finalize()
        total += time.perf_counter() - t0
        audio += len(a) / S.SAMPLE_RATE
        lat += st.chunk_latencies_ms
    torch.set_num_threads(prev_threads)  # a 1-thread torch session sets the process-wide count
    out.update(rtf_1thread=round(total / audio, 4), chunk_ms_p50=round(float(np.percentile(lat, 50)), 3),
               chunk_ms_p99=round(float(np.percentile(lat, 99)), 3), chunks=len(lat),
               algorithmic_latency_ms=DEFAULT.algorithmic_latency_ms)
    if variant.format == "onnx":
        out["peak_rss_mb"] = runner_peak_rss_mb(variant.path, c.test_audio[0])
    return out


def runner_peak_rss_mb(model_path: str, audio: np.ndarray) -> float | None:
    """Peak RSS (MiB, ``VmHWM``) of the bundle runner (``asr_stream.py MODEL features.json utt.wav``)
    in a fresh Python process. ``VmHWM`` is read inside that process at the end: the child's
    ``ru_maxrss`` would also count the parent's pages it shared between fork and exec."""
    import subprocess
    import sys
    import tempfile
    import wave
    from pathlib import Path

    with tempfile.TemporaryDirectory() as td:
        wav = Path(td) / "utt.wav"
        with wave.open(str(wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(S.SAMPLE_RATE)
            w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
        feats = Path(td) / "features.json"
        feats.write_text(json.dumps(feature_config()))
        code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
                "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)")
        p = subprocess.run([sys.executable, "-c", code, asr_stream.__file__, str(model_path), str(feats), str(wav)],
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0 or not p.stderr.strip():
            return None
        return round(int(p.stderr.strip().splitlines()[-1]) / 1024, 1)  # VmHWM is in kB


register_adapter(ArchAdapter("asr", plan=plan, evaluate=lambda ctx, session: evaluate_cer(session)["cer"],
                             measure=lambda ctx, v, session: measure_streaming(ctx, v, session)))
