"""LoRA and QLoRA on the zoo's GPT: adapt the Shakespeare model to the Python tutorial (Debian python3.11-doc).

One run, on this machine: LoRA (FP32 base), QLoRA (NF4 base with double quantization, bitsandbytes),
and a full fine-tune of the same steps as the reference, each through
:func:`deepship.pipeline.finetune.adapt_decoder`. Recorded: held-out perplexity on the new text (the
tutorial's last 10%) and on Shakespeare's held-out text (forgetting), trainable share, seconds per
step, peak RSS, base weight bytes in memory, adapter bytes, the merged model's perplexity and its
largest logit difference to the unmerged model; and the issue's bars. Writes
``benchmarks/results/lora.json``. Run::

    .venv/bin/python benchmarks/lora.py [--steps 300] [--threads 2]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "lora.json"))
    args = ap.parse_args()

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
    Path(args.results).write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(bars, indent=1))


if __name__ == "__main__":
    main()
