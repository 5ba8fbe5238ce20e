"""LoRA and QLoRA on the zoo's GPT: adapt the Shakespeare model to the Python tutorial (Debian python3.11-doc).

One run, on this machine: LoRA (FP32 base), QLoRA (NF4 base with double quantization, bitsandbytes),
and a full fine-tune of the same steps as the reference, each through
:func:`deepship.pipeline.finetune.adapt_decoder`. Recorded: held-out perplexity on the new text (the
tutorial's last 10%) and on Shakespeare's held-out text (forgetting), trainable share, seconds per
step, peak RSS, base weight bytes in memory, adapter bytes, the merged model's perplexity and its
largest logit difference to the unmerged model; and the issue's bars. Writes
``benchmarks/results/lora.json``. Run::

    .venv/bin/python benchmarks/lora.py [--steps 300] [--threads 2] [--only gpt|asr]

The ``asr`` section (issue 17's ASR personalization): LoRA on the streaming recognizer's attention and
convolution-module linear layers with about 4.5 minutes of one voice never heard in training (Flite's
awb), CER on that voice's held-out sentences before/after, CER on the other voices, adapter bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


#: the personalization voice: Flite's awb (a Scottish English speaker), heard in no training utterance
ASR_VOICE = ("flite", "awb")


def asr_section(rank: int, steps: int, threads: int, minutes: float, lr: float = 1e-3) -> dict:
    """LoRA on the recognizer for one unseen voice: ``minutes`` of it speaking training-pool texts
    (never the test sentences), evaluated on the unseen-synthesizer test set's utterances by that voice
    (held-out sentences) and on the held-out sentences by the other voices."""
    import numpy as np

    from deepship import api
    from deepship.models.asr import data as S
    from deepship.models.asr import text as T
    from deepship.models.asr import voices as V
    from deepship.pipeline.finetune import LoraOptions
    from deepship.pipeline.arch.asr_lora import ASR_TARGETS, adapt_recognizer

    ctx = api.load("asr")
    c = ctx.spec.train_data()
    r = {**S.DEFAULT_RECIPE, **ctx.spec.recipe["corpus"]}
    pool = T.text_plan(r["text"], r["test_text"], int(r["seed"]), int(r["max_words"]))["train"]
    rng = np.random.default_rng(7)
    voice = V.Voice(*ASR_VOICE, 1.0)
    label = f"{ASR_VOICE[0]}:{ASR_VOICE[1]}"
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)

        def write(name, audio, texts):
            lines = []
            for i, (a, t) in enumerate(zip(audio, texts)):
                S.write_wav(td / f"{name}{i}.wav", a)
                lines.append(f"{name}{i}.wav\t{t}")
            (td / f"{name}.tsv").write_text("\n".join(lines) + "\n")
            return td / f"{name}.tsv"

        audio, texts, total = [], [], 0.0
        for i in rng.permutation(len(pool)):
            if len(pool[i].split()) < 3:
                continue
            # the wearer speaks at varying speed (as the test set's Flite voices do)
            a = V.synthesize(pool[i], V.Voice(voice.engine, voice.name, round(float(rng.uniform(0.8, 1.25)), 2)))
            if total + len(a) / 16000 > minutes * 60:
                break
            audio.append(a)
            texts.append(pool[i])
            total += len(a) / 16000
        us = c.sets["unseen_synth"]
        ev = [i for i, v in enumerate(us.voices) if v == label]
        train = write("train", audio, texts)
        evals = write("eval", [c.audio("unseen_synth")[i] for i in ev], [us.texts[i] for i in ev])
        opts = LoraOptions(rank=rank, alpha=2.0 * rank, targets=list(ASR_TARGETS), steps=steps, batch_size=8,
                           lr=lr, threads=threads)
        res = adapt_recognizer(ctx, train, opts, td / "out", evals, progress=print)
    res["voice"] = label
    res["bars"] = {
        "voice_cer_down_at_least_30pct_relative": res.get("voice_cer_reduction", 0) >= 0.30,
        "others_cer_at_most_plus_1pt": res["others_cer_change_pt"] <= 1.0,
        "adapter_at_most_100KB": res["adapter_bytes"] <= 100_000,
        "at_most_5_minutes_of_audio": res["train_audio_s"] <= 300,
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "lora.json"))
    ap.add_argument("--only", choices=["all", "gpt", "asr"], default="all",
                    help="run one section; the other's results in the file are kept")
    ap.add_argument("--asr-steps", type=int, default=400)
    ap.add_argument("--asr-minutes", type=float, default=4.5)
    ap.add_argument("--asr-lr", type=float, default=1e-3)
    args = ap.parse_args()
    if args.only == "asr":
        path = Path(args.results)
        res = json.loads(path.read_text()) if path.is_file() else {}
        res["asr"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": os.getloadavg(),
                      **asr_section(args.rank, args.asr_steps, args.threads, args.asr_minutes, args.asr_lr)}
        path.write_text(json.dumps(res, indent=2, default=str))
        print(json.dumps(res["asr"]["bars"], indent=1))
        return

    from deepship import api
    from deepship.pipeline.finetune import LoraOptions, adapt_decoder
    from deepship.utils import machine_info

    ctx = api.load("gpt")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("lora", "qlora"):
            opts = LoraOptions(rank=args.rank, alpha=2.0 * args.rank, targets=["qkv", "proj", "fc"], steps=args.steps,
                               qlora=method == "qlora", threads=args.threads)
            t0 = time.perf_counter()
            runs[method] = adapt_decoder(ctx, "python-docs", opts, Path(tmp) / method, do_merge=True,
                                         full_reference=method == "lora", progress=print)
            runs[method]["wall_s"] = round(time.perf_counter() - t0, 1)
            print(method, json.dumps({k: runs[method][k] for k in ("before", "after", "base_bytes_ratio")}))
    lo, ql = runs["lora"], runs["qlora"]
    bars = {
        "lora_domain_ppl_at_least_40pct_below_base": lo["domain_ppl_reduction"] >= 0.40,
        "trainable_share_at_most_3pct": lo["train"]["trainable_share"] <= 0.03,
        "qlora_ppl_within_5pct_of_lora": ql["after"]["domain_ppl"] <= 1.05 * lo["after"]["domain_ppl"],
        "qlora_base_bytes_at_most_0.35x": ql["base_bytes_ratio"] <= 0.35,
        "merged_lora_logits_within_1e-4_of_unmerged": lo["merged"]["max_abs_logit_diff_vs_unmerged"] <= 1e-4,
    }
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), "cpu": platform.processor(),
           "loadavg": os.getloadavg(), "text": "python-docs (Debian python3.11-doc, tutorial reST; last 10% held out)",
           "runs": runs, "bars": bars,
           "note": "merged-model check is in PyTorch (merged module vs PEFT's unmerged); the ONNX export of the "
                   "merged model is not wired into the report yet"}
    if args.only == "all":
        res["asr"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": os.getloadavg(),
                      **asr_section(args.rank, args.asr_steps, args.threads, args.asr_minutes, args.asr_lr)}
    Path(args.results).write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(bars, indent=1))


if __name__ == "__main__":
    main()
