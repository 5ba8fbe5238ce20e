"""Streaming ASR for the hearing aid: the issue's bars, measured on every variant.

For FP32 torch, FP32 ONNX, INT8 dynamic and INT8 static QDQ of the ``asr`` zoo model:

- CER and WER (jiwer) of greedy CTC on the 200 held-out utterances (voices and sentences unseen in
  training), clean and at 10 dB SNR, streamed chunk by chunk; CER with the CTC prefix beam search
  (width 8) on the clean set for the FP32 ONNX and INT8 static variants;
- real-time factor on 1 thread (compute time / audio time over 20 held-out utterances streamed in
  40 ms pieces, fbank included) and the per-chunk compute latency p50/p99 (ms) of that run;
- algorithmic latency (chunk + fbank window overhang; the model has no lookahead);
- size on disk, and the bundle (``optimize asr bundle``, INT8 static) in bytes;
- peak RSS of a fresh bundle runner process (onnxruntime + numpy + kaldi-native-fbank).

The bundle and the RTF/latency bars use the deployed variant (INT8 dynamic, ``api.ASR_DEPLOY_VARIANT``).
Bars: INT8 bundle <= 2 MB; RTF <= 0.05 on 1 thread; per-chunk p99 <= 5 ms for a 40 ms chunk;
algorithmic latency <= 200 ms; CER on clean held-out voices <= 10%; INT8 CER within 1 point of FP32.

Writes ``benchmarks/results/asr.json`` and ``asr.md``. Run::

    .venv/bin/python benchmarks/asr.py
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs a line per 1-D weight

VARIANTS = ["fp32-torch", "fp32-onnx", "int8-dynamic", "int8-static"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--rtf-utterances", type=int, default=20)
    args = ap.parse_args()

    from deepship import api
    from deepship.models import asr as A
    from deepship.models.asr import data as S
    from deepship.pipeline.arch import asr as AA
    from deepship.runtimes.asr_stream import ctc_prefix_beam_search
    from deepship.utils import machine_info

    ctx = api.load("asr")
    corpus = A.corpus()
    rows = {}
    for name in VARIANTS:
        t0 = time.perf_counter()
        v = api.asr_variant(ctx, name)
        sess = ctx.session(v, threads=1)
        clean = AA.evaluate_cer(sess)
        m = AA.measure_streaming(ctx, v, sess, utterances=args.rtf_utterances)
        row = {"variant": name, "format": v.format, "precision": v.precision, "size_bytes": v.size_bytes(),
               "cer": round(clean["cer"], 4), **m}
        if name in ("fp32-onnx", "int8-dynamic", "int8-static"):
            lps = A.stream_batch(sess.run, corpus.test.feats, A.DEFAULT, A.feature_mean())
            hyps = [S.decode_labels(ctc_prefix_beam_search(lp, beam=8)).strip() for lp in lps]
            row["cer_beam8"] = round(AA.error_rates(hyps, corpus.test.texts)["cer"], 4)
        row["measure_s"] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        print(json.dumps(row), flush=True)
    with tempfile.TemporaryDirectory() as td:
        b = api.asr_bundle(Path(td) / "bundle", measure=False)
    fp32, int8 = rows["fp32-onnx"], rows[api.ASR_DEPLOY_VARIANT]
    st = rows["int8-static"]
    bars = {
        "bundle_bytes": {"value": b["bundle_bytes"], "target": "<= 2 MB (2,000,000 bytes)", "met": b["bundle_bytes"] <= 2_000_000},
        "rtf_1thread_bundled_int8": {"value": int8["rtf_1thread"], "target": "<= 0.05", "met": int8["rtf_1thread"] <= 0.05},
        "chunk_ms_p99_bundled_int8": {"value": int8["chunk_ms_p99"], "target": "<= 5 ms", "met": int8["chunk_ms_p99"] <= 5},
        "algorithmic_latency_ms": {"value": A.DEFAULT.algorithmic_latency_ms, "target": "<= 200 ms",
                                   "met": A.DEFAULT.algorithmic_latency_ms <= 200},
        "cer_clean_fp32": {"value": fp32["cer"], "target": "<= 10%", "met": fp32["cer"] <= 0.10},
        "cer_int8_dynamic_minus_fp32_pt": {"value": round((int8["cer"] - fp32["cer"]) * 100, 2), "target": "<= 1 point",
                                           "met": (int8["cer"] - fp32["cer"]) * 100 <= 1.0},
        "cer_int8_static_minus_fp32_pt": {"value": round((st["cer"] - fp32["cer"]) * 100, 2), "target": "<= 1 point",
                                          "met": (st["cer"] - fp32["cer"]) * 100 <= 1.0},
    }
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "config": A.DEFAULT.to_dict(),
           "corpus": {"train_utterances": len(corpus.train), "train_hours": round(float(corpus.train.seconds.sum()) / 3600, 2),
                      "test_utterances": len(corpus.test), "test_seconds": round(float(corpus.test.seconds.sum()), 1)},
           "variants": rows, "bundle": {"variant": b["variant"], **{k: b[k] for k in ("bundle_bytes", "size_bytes", "files")}},
           "bars": bars}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "asr.json").write_text(json.dumps(res, indent=1))
    lines = ["| variant | size KB | CER clean | WER clean | CER 10 dB | RTF 1 thread | chunk p50 ms | chunk p99 ms | runner peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['variant']} | {r['size_bytes'] / 1024:.0f} | {r['cer'] * 100:.2f}% | {r['wer'] * 100:.2f}% | "
                     f"{r['cer_noisy'] * 100:.2f}% | {r['rtf_1thread']:.4f} | {r['chunk_ms_p50']:.3f} | {r['chunk_ms_p99']:.3f} | "
                     f"{r.get('peak_rss_mb') or '-'} |")
    lines += ["", "| bar | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['value']} | {v['target']} | {'yes' if v['met'] else 'NO'} |" for k, v in bars.items()]
    (out / "asr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
