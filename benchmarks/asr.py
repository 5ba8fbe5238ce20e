"""Streaming ASR for the hearing aid: the open-vocabulary bars of issue 15, measured on every variant and
against a classical peer recognizer in the same run.

For FP32 torch, FP32 ONNX, INT8 dynamic (the bundle) and INT8 static QDQ of the ``asr`` zoo model, on
the corpus's held-out sets (``deepship/models/asr/data.py``), streamed chunk by chunk, greedy CTC:

- ``sentences``: held-out sentences (each with a word no training text has) by the seen synthesizers
  (held-out espeak-ng variants, Festival), clean and at 10 dB SNR;
- ``unseen_synth``: held-out sentences spoken by Flite, a synthesizer never heard in training;
- ``words``: isolated dictionary words never in any training text, by all three synthesizers;

CER and WER (jiwer) per set, CER and WER with the CTC prefix beam search (width 8) without and with the
character 4-gram LM (weights chosen on the calibration utterances) for the ONNX variants, the share of distinct first characters on ``words`` (the prefix-collapse symptom),
real-time factor on 1 thread and per-chunk p50/p99 (40 ms chunks, fbank included), algorithmic latency,
sizes and the bundle. Streaming = whole utterance: the FP32 model's streamed transcripts against its
whole-utterance forward. The peer: pocketsphinx 5 (CMU Sphinx, en-us acoustic model + trigram LM +
dictionary in its wheel, the ``bench`` extra) decodes the same audio. ``uptime`` is read before timing.

Writes ``benchmarks/results/asr.json`` and ``asr.md``. Run::

    .venv/bin/python benchmarks/asr.py
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs a line per 1-D weight

VARIANTS = ["fp32-torch", "fp32-onnx", "int8-dynamic", "int8-static"]
SETS = ["sentences", "unseen_synth", "words"]


def pocketsphinx_rates(corpus, sets) -> dict:
    """CER/WER and 1-thread RTF of pocketsphinx's default en-us recognizer on each set's audio."""
    from pocketsphinx import Decoder, get_model_path

    from deepship.models.asr import text as T
    from deepship.pipeline.arch import asr as AA

    dec = Decoder(samprate=16000, loglevel="FATAL")
    size = sum(f.stat().st_size for f in Path(get_model_path(), "en-us").rglob("*") if f.is_file())
    out = {"model_bytes": size}
    for name in sets:
        s = corpus.sets[name]
        hyps, t, audio = [], 0.0, 0.0
        for a in corpus.audio(name):
            pcm = (np.clip(a, -1, 1) * 32767).astype("<i2").tobytes()
            t0 = time.perf_counter()
            dec.start_utt()
            dec.process_raw(pcm, full_utt=True)
            dec.end_utt()
            t += time.perf_counter() - t0
            audio += len(a) / 16000
            h = dec.hyp()
            hyps.append(T.normalize(h.hypstr) if h is not None else "")
        er = AA.error_rates(hyps, s.texts)
        out[name] = {"cer": round(er["cer"], 4), "wer": round(er["wer"], 4), "rtf_1thread": round(t / audio, 4)}
        if name == "words":
            out[name]["first_char"] = AA.first_char_diversity(hyps, s.texts)
        print("pocketsphinx", name, out[name], flush=True)
    return out


def pick_lm_weights(sess, corpus) -> dict:
    """``alpha`` (LM weight) and ``beta`` (per-character bonus) of the beam search with the character LM,
    chosen on the calibration utterances (training voices and texts; never a test set)."""
    from deepship.models import asr as A
    from deepship.models.asr import data as S
    from deepship.pipeline.arch import asr as AA
    from deepship.runtimes.asr_stream import ctc_prefix_beam_search

    lm, cal = AA.char_lm(), corpus.calib
    lps = A.stream_batch(sess.run, cal.feats, A.DEFAULT, A.feature_mean())
    best = None
    for alpha in (0.2, 0.4, 0.7, 1.0):
        for beta in (0.0, 0.5, 1.0, 2.0):
            hyps = [S.decode_labels(ctc_prefix_beam_search(lp, 8, lm=lm, tokens=S.VOCAB, alpha=alpha, beta=beta)).strip()
                    for lp in lps]
            cer = AA.error_rates(hyps, cal.texts)["cer"]
            if best is None or cer < best["calib_cer"]:
                best = {"alpha": alpha, "beta": beta, "calib_cer": round(cer, 4)}
    return best


def streaming_equals_whole(corpus) -> dict:
    """Greedy transcripts of the FP32 model streamed chunk by chunk (explicit state) against its
    whole-utterance forward, on every test set: the share of identical transcripts and the CER between them."""
    import torch

    from deepship.models import asr as A
    from deepship.pipeline.arch import asr as AA

    m, mean = A.trained(), A.feature_mean()
    same, n, diffs = 0, 0, []
    for name in SETS:
        feats = corpus.sets[name].feats
        streamed = [AA.greedy_text(lp) for lp in A.stream_batch(A.torch_run(m), feats, A.DEFAULT, mean)]
        whole = []
        with torch.no_grad():
            for f in feats:
                x = torch.from_numpy(A.pad_frames(f, mean, A.DEFAULT.chunk_frames)[None])
                whole.append(AA.greedy_text(m.forward_full(x)[0, :-(-len(f) // A.SUBSAMPLING)].numpy()))
        same += sum(a == b for a, b in zip(streamed, whole))
        n += len(feats)
        diffs += [(a, b) for a, b in zip(streamed, whole) if a != b]
    cer = AA.error_rates([a for a, _ in diffs], [b for _, b in diffs])["cer"] if diffs else 0.0
    return {"utterances": n, "identical": same, "identical_share": round(same / n, 4), "cer_where_different": round(cer, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--rtf-utterances", type=int, default=20)
    ap.add_argument("--no-peer", action="store_true", help="skip pocketsphinx")
    args = ap.parse_args()

    from deepship import api
    from deepship.models import asr as A
    from deepship.models.asr import data as S
    from deepship.pipeline.arch import asr as AA
    from deepship.runtimes.asr_stream import ctc_prefix_beam_search
    from deepship.utils import machine_info

    load_before = os.getloadavg()
    ctx = api.load("asr")
    corpus = A.corpus()
    rows = {}
    lmw = None
    for name in VARIANTS:
        t0 = time.perf_counter()
        v = api.asr_variant(ctx, name)
        sess = ctx.session(v, threads=1)
        m = AA.measure_streaming(ctx, v, sess, utterances=args.rtf_utterances)
        row = {"variant": name, "format": v.format, "precision": v.precision, "size_bytes": v.size_bytes(),
               "cer": round(AA.evaluate_cer(sess)["cer"], 4), **m}
        hyps = AA.transcribe_set(sess, "words")
        row["first_char_words"] = AA.first_char_diversity(hyps, corpus.sets["words"].texts)
        if v.format == "onnx":
            lmw = lmw or pick_lm_weights(sess, corpus)
            for part in SETS:
                lps = A.stream_batch(sess.run, corpus.sets[part].feats, A.DEFAULT, A.feature_mean())
                for tag, kw in (("beam8", {}), ("beam8_lm", {"lm": AA.char_lm(), "tokens": S.VOCAB, "alpha": lmw["alpha"],
                                                            "beta": lmw["beta"]})):
                    hyps = [S.decode_labels(ctc_prefix_beam_search(lp, 8, **kw)).strip() for lp in lps]
                    er = AA.error_rates(hyps, corpus.sets[part].texts)
                    row[f"cer_{tag}_{part}"], row[f"wer_{tag}_{part}"] = round(er["cer"], 4), round(er["wer"], 4)
        row["measure_s"] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        print(json.dumps(row), flush=True)
    load_after = os.getloadavg()
    peer = None if args.no_peer else pocketsphinx_rates(corpus, SETS)
    equal = streaming_equals_whole(corpus)
    print("streaming vs whole", equal, flush=True)
    with tempfile.TemporaryDirectory() as td:
        b = api.asr_bundle(Path(td) / "bundle", measure=False)
    fp32, int8 = rows["fp32-onnx"], rows[api.ASR_DEPLOY_VARIANT]

    def bar(value, target, met):
        return {"value": value, "target": target, "met": bool(met)}

    cols = {"sentences": "cer", "sentences_10db": "cer_noisy", "unseen_synth": "cer_unseen_synth", "words": "cer_words"}
    bars = {
        "cer_unseen_synth_int8": bar(int8["cer_unseen_synth"], "<= 15%", int8["cer_unseen_synth"] <= 0.15),
        "wer_unseen_synth_int8": bar(int8["wer_unseen_synth"], "<= 35%", int8["wer_unseen_synth"] <= 0.35),
        "cer_isolated_words_int8": bar(int8["cer_words"], "<= 20%", int8["cer_words"] <= 0.20),
        "cer_seen_synth_unseen_words_int8": bar(int8["cer"], "<= 8%", int8["cer"] <= 0.08),
        "bundle_bytes": bar(b["bundle_bytes"], "<= 2 MB (2,000,000 bytes)", b["bundle_bytes"] <= 2_000_000),
        "chunk_ms": bar(A.DEFAULT.chunk_ms, "40 ms", A.DEFAULT.chunk_ms == 40),
        "rtf_1thread_bundled_int8": bar(int8["rtf_1thread"], "<= 0.05", int8["rtf_1thread"] <= 0.05),
        "chunk_ms_p99_bundled_int8": bar(int8["chunk_ms_p99"], "<= 5 ms", int8["chunk_ms_p99"] <= 5),
        "algorithmic_latency_ms": bar(A.DEFAULT.algorithmic_latency_ms, "<= 200 ms", A.DEFAULT.algorithmic_latency_ms <= 200),
        "streaming_equals_whole_utterance": bar(equal["identical_share"], "1.0 (every transcript identical)",
                                                equal["identical_share"] >= 1.0),
        "first_char_diversity_words_int8": bar(int8["first_char_words"]["ratio"], ">= 0.8 of the references'",
                                               int8["first_char_words"]["ratio"] >= 0.8),
    }
    for q in ("int8-dynamic", "int8-static"):
        worst = max((rows[q][c] - fp32[c]) * 100 for c in cols.values())
        bars[f"cer_{q.replace('-', '_')}_minus_fp32_pt_every_set"] = bar(round(worst, 2), "<= 1 point", worst <= 1.0)
    res = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
           "load_average": {"before": [round(x, 2) for x in load_before], "after_variants": [round(x, 2) for x in load_after],
                            "quiet": load_before[0] < 0.5},
           "config": A.DEFAULT.to_dict(), "sets": {k: {"utterances": len(corpus.sets[k]),
                                                       "seconds": round(float(corpus.sets[k].seconds.sum()), 1)} for k in SETS},
           "train": {"utterances": len(corpus.train), "hours": round(float(corpus.train.seconds.sum()) / 3600, 2)},
           "lm": {"order": AA.LM_ORDER, "weights_chosen_on_calibration": lmw}, "variants": rows, "peer_pocketsphinx": peer, "streaming_vs_whole": equal,
           "bundle": {"variant": b["variant"], **{k: b[k] for k in ("bundle_bytes", "size_bytes", "files")}}, "bars": bars}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "asr.json").write_text(json.dumps(res, indent=1))
    lines = ["| variant | size KB | CER sentences | WER sentences | CER 10 dB | CER unseen synth | WER unseen synth | "
             "CER words | WER words | RTF 1 thread | chunk p50 ms | chunk p99 ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda x: f"{x * 100:.2f}%"  # noqa: E731
    for r in rows.values():
        lines.append(f"| {r['variant']} | {r['size_bytes'] / 1024:.0f} | {pct(r['cer'])} | {pct(r['wer'])} | {pct(r['cer_noisy'])} | "
                     f"{pct(r['cer_unseen_synth'])} | {pct(r['wer_unseen_synth'])} | {pct(r['cer_words'])} | {pct(r['wer_words'])} | "
                     f"{r['rtf_1thread']:.4f} | {r['chunk_ms_p50']:.3f} | {r['chunk_ms_p99']:.3f} |")
    if peer:
        lines.append(f"| pocketsphinx 5 (peer) | {peer['model_bytes'] / 1024:.0f} | {pct(peer['sentences']['cer'])} | "
                     f"{pct(peer['sentences']['wer'])} | - | {pct(peer['unseen_synth']['cer'])} | {pct(peer['unseen_synth']['wer'])} | "
                     f"{pct(peer['words']['cer'])} | {pct(peer['words']['wer'])} | {peer['sentences']['rtf_1thread']:.4f} | - | - |")
    lines += ["", "Beam search (width 8) without and with the character 4-gram LM (CER / WER):", "",
              "| variant | " + " | ".join(f"{p} beam | {p} beam+LM" for p in SETS) + " |", "|---|" + "---|---|" * len(SETS)]
    for r in rows.values():
        if "cer_beam8_words" in r:
            lines.append(f"| {r['variant']} | " + " | ".join(
                f"{pct(r[f'cer_beam8_{p}'])} / {pct(r[f'wer_beam8_{p}'])} | {pct(r[f'cer_beam8_lm_{p}'])} / {pct(r[f'wer_beam8_lm_{p}'])}"
                for p in SETS) + " |")
    lines += ["", "| bar | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['value']} | {v['target']} | {'yes' if v['met'] else 'NO'} |" for k, v in bars.items()]
    lines += ["", f"Load average before timing: {load_before[0]:.2f} ({'quiet' if load_before[0] < 0.5 else 'LOADED'}); "
              f"after the variants: {load_after[0]:.2f}."]
    (out / "asr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
