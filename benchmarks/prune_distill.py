"""Benchmark for pruning and distillation (issue 4): the three bars, measured through the pipeline.

1. Digits CNN: structured-pruned (torch-pruning, group L2, fine-tuned) + INT8 static QDQ against the
   FP32 ONNX model: batch-32 p50 latency ratio (bar >= 2x) and accuracy drop (bar <= 1 point).
2. Distillation: a width-0.5 student (<= 0.5x the teacher's parameters) distilled with the Hinton
   et al. 2015 loss against the same student trained on labels only (alpha = 1), same recipe and
   epochs, over several seeds, for the MLP and the CNN teachers (bar: within 1 point of the teacher
   and better than the no-teacher student).
3. Sunspots LSTM: structured-pruned and distilled variants, MAE within 5% (relative) of the original.
4. GPT decoder: half the attention heads and half the MLP width removed (torch-pruning), fine-tuned,
   exported with the KV cache and quantized to INT4: held-out perplexity, parameters, size, decode
   tokens/s at batch 1 and 8 (no bar in the issue; the numbers say what pruning buys a decoder).

Latency: ONNX Runtime CPU, interleaved rounds of :func:`deepship.runtimes.benchmark.measure`
(median of the rounds' p50), at 1 and 2 intra-op threads. Numbers depend on the machine and on
what else runs on it; the JSON records the machine.

Run::

    DEEPSHIP_CACHE=/tmp/bench-cache .venv/bin/python benchmarks/prune_distill.py [--quick] [--only gpt]

Writes ``benchmarks/results/prune_distill.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepship import api  # noqa: E402
from deepship.pipeline.evaluate import bench_feeds, evaluate  # noqa: E402
from deepship.runtimes.benchmark import measure  # noqa: E402
from deepship.utils import machine_info, write_json_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "prune_distill.json"


def metric(ctx, v) -> float:
    return float(evaluate(ctx, ctx.session(v, threads=1), None)["metric"])


def latencies(ctx, variants, batch: int, threads: int, rounds: int, min_time_s: float) -> dict[str, float]:
    """Median over ``rounds`` interleaved rounds of each variant's p50 (ms) at ``batch``."""
    sessions = {v.name: ctx.session(v, threads=threads) for v in variants}
    feeds = bench_feeds(ctx, batch)
    per: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(rounds):
        for n, s in sessions.items():
            per[n].append(measure(s, feeds, min_time_s=min_time_s, batch=batch).p50_ms)
    return {n: statistics.median(v) for n, v in per.items()}


def bar_cnn_prune(quick: bool) -> dict:
    ctx = api.load("cnn")
    fp32 = api.export(ctx)
    base_int8 = api.quantize(ctx, "int8-static")
    rows, variants = [], [fp32, base_int8]
    base_acc = metric(ctx, ctx.baseline())
    for s in ((0.5,) if quick else (0.5, 0.75)):
        v = api.prune(ctx, s, "structured", importance="l2", finetune_steps=300)
        onnx_v, q = api.carry_on(ctx, v, ["int8-static"])
        variants += [onnx_v, q]
        rows.append((s, v, onnx_v, q))
    lat = {}
    for threads in (1, 2):
        for b in (1, 32):
            lat[(threads, b)] = latencies(ctx, variants, b, threads, rounds=3 if quick else 5, min_time_s=1.0)
    out = {"model": "cnn", "baseline_accuracy": base_acc, "fp32_onnx": fp32.name, "variants": []}
    for v in variants:
        entry = {"variant": v.name, "parent": v.parent, "parameters": v.info.get("parameters"),
                 "size_bytes": v.size_bytes(), "accuracy": metric(ctx, v),
                 "p50_ms": {f"t{t}_b{b}": lat[(t, b)][v.name] for (t, b) in lat},
                 "speedup_vs_fp32_onnx": {f"t{t}_b{b}": lat[(t, b)][fp32.name] / lat[(t, b)][v.name] for (t, b) in lat}}
        entry["accuracy_drop_pt"] = (base_acc - entry["accuracy"]) * 100
        out["variants"].append(entry)
    for s, v, onnx_v, q in rows:
        out.setdefault("pruned", []).append({"sparsity": s, "arch": v.info["arch"], "finetune_steps": v.info["finetune"]["steps"],
                                             "parameters": v.info["parameters"], "parameters_before": v.info["parameters_before"],
                                             "accuracy_before_finetune": v.info["metric_before_finetune"]})
    best = [e for e in out["variants"] if e["variant"].endswith("-int8-static") and e["variant"].startswith("pruned")]
    ok = [e for e in best if e["speedup_vs_fp32_onnx"]["t2_b32"] >= 2.0 and e["accuracy_drop_pt"] <= 1.0]
    out["bar"] = {"text": "structured-pruned + INT8 >= 2x lower batch-32 latency than FP32 ONNX, <= 1 point accuracy drop",
                  "met_by": [e["variant"] for e in ok], "met": bool(ok)}
    return out


def bar_distill(quick: bool) -> dict:
    out = {}
    seeds = (0,) if quick else (0, 1, 2)
    for name, epochs in (("mlp", 120), ("cnn", 90)):
        ctx = api.load(name)
        teacher_acc = metric(ctx, ctx.baseline())
        res = {"teacher_accuracy": teacher_acc, "teacher_parameters": ctx.baseline().info["parameters"],
               "epochs": epochs, "temperature": 4.0, "alpha": 0.1, "student": "width=0.5", "seeds": list(seeds),
               "kd": [], "scratch": []}
        for seed in seeds:
            t0 = time.perf_counter()
            kd = api.distill(ctx, "width=0.5", 4.0, 0.1, epochs, seed, name=f"bench-distilled-w50-s{seed}")
            sc = api.distill(ctx, "width=0.5", 4.0, 1.0, epochs, seed, name=f"bench-student-w50-scratch-s{seed}")
            res["kd"].append(metric(ctx, kd))
            res["scratch"].append(metric(ctx, sc))
            res["student_arch"] = kd.info["arch"]
            res["student_parameters"] = kd.info["parameters"]
            res["param_ratio"] = kd.info["param_ratio"]
            print(f"  {name} seed {seed}: kd {res['kd'][-1] * 100:.2f}  scratch {res['scratch'][-1] * 100:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        res["kd_mean"], res["scratch_mean"] = statistics.mean(res["kd"]), statistics.mean(res["scratch"])
        res["kd_minus_scratch_pt"] = (res["kd_mean"] - res["scratch_mean"]) * 100
        res["teacher_minus_kd_pt"] = (teacher_acc - res["kd_mean"]) * 100
        res["seeds_kd_better"] = sum(a > b for a, b in zip(res["kd"], res["scratch"]))
        res["seeds_tied"] = sum(a == b for a, b in zip(res["kd"], res["scratch"]))
        res["bar_met"] = bool(res["param_ratio"] <= 0.5 and res["teacher_minus_kd_pt"] <= 1.0 and res["kd_minus_scratch_pt"] > 0)
        out[name] = res
    return out


def bar_lstm(quick: bool) -> dict:
    ctx = api.load("lstm")
    base = metric(ctx, ctx.baseline())
    rows = []
    pv = api.prune(ctx, 0.5, "structured", finetune_steps=300)
    rows.append((pv, "structured prune 50% hidden units, 300 fine-tune steps"))
    dv = api.distill(ctx, "width=0.5", 4.0, 0.1, None, 0)
    rows.append((dv, "width-0.5 student (hidden 32), MSE-KD alpha 0.1, the teacher's recipe (150 epochs)"))
    if not quick:
        sv = api.distill(ctx, "width=0.5", 4.0, 1.0, None, 0)
        rows.append((sv, "same student, labels only (no teacher)"))
    out = {"model": "lstm", "baseline_mae": base, "variants": []}
    for v, desc in rows:
        onnx_v, = api.carry_on(ctx, v)
        m, mo = metric(ctx, v), metric(ctx, onnx_v)
        out["variants"].append({"variant": v.name, "what": desc, "parameters": v.info["parameters"],
                                "parameters_before": v.info.get("parameters_before", v.info.get("teacher_parameters")),
                                "mae": m, "mae_onnx": mo, "relative_change": (m - base) / base})
    ok = [e["variant"] for e in out["variants"] if e["relative_change"] <= 0.05 and "scratch" not in e["variant"]]
    out["bar"] = {"text": "a pruned or distilled variant within 5% relative MAE of the original", "met_by": ok, "met": bool(ok)}
    return out


def decode_tok_s(ctx, variants, batch: int, rounds: int, new_tokens: int = 64) -> dict[str, float]:
    """Median over ``rounds`` interleaved rounds of each decoder variant's greedy decode tokens/s
    (``batch`` held-out 64-token prompts, ``new_tokens`` new tokens each, prefill excluded, 1 thread)."""
    from deepship.models import gpt
    from deepship.pipeline.arch import gpt as AG
    from deepship.runtimes.generate import generate

    runners = {v.name: AG.variant_runner(ctx, v, threads=1) for v in variants}
    prompts = gpt.heldout_prompts(8, gpt.REPORT_PROMPT_TOKENS)[:batch]
    per: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(rounds):
        for n, r in runners.items():
            res = generate(r, prompts, new_tokens)
            per[n].append(res.decode_tok_s)
    return {n: statistics.median(v) for n, v in per.items()}


def bar_gpt(quick: bool) -> dict:
    from deepship.models import gpt
    from deepship.pipeline.arch import gpt as AG

    ctx = api.load("gpt")
    fp32 = AG.build_variant(ctx, "fp32-onnx")
    int4 = AG.build_variant(ctx, "int4-b32")
    steps = [300] if quick else [300, 1000]
    chains = []
    for n in steps:
        name = "pruned-structured-50" if n == AG.PRUNE_FINETUNE_STEPS else f"pruned-structured-50-ft{n}"
        pv = ctx.build(name, "prune", "structured", {"sparsity": 0.5, "importance": "l2", "finetune_steps": n},
                       ctx.baseline())  # the report plan's parameters at 300 steps: the same cached variant
        chains.append((n, pv, *api.carry_on(ctx, pv, ["int4-weight-only"])))
    onnx_variants = [fp32, int4] + [v for c in chains for v in c[2:]]
    ppl = {v.name: metric(ctx, v) for v in [ctx.baseline()] + onnx_variants}
    rounds = 3 if quick else 5
    tps = {b: decode_tok_s(ctx, onnx_variants, b, rounds) for b in (1, 8)}
    base = ppl["fp32-torch"]
    out = {"model": "gpt", "baseline_perplexity": base, "bigram_perplexity": gpt.bigram_baseline()["value"],
           "variants": []}
    for v in onnx_variants:
        tv = next((c[1] for c in chains if v in c[2:]), None)
        out["variants"].append({
            "variant": v.name, "finetune_steps": tv.info["finetune"]["steps"] if tv else None,
            "arch": AG.variant_config(ctx, v).to_dict(), "parameters": (tv or ctx.baseline()).info.get("parameters"),
            "size_bytes": v.size_bytes(), "perplexity": ppl[v.name], "perplexity_change": ppl[v.name] - base,
            "decode_tok_s": {f"b{b}": round(tps[b][v.name], 1) for b in tps},
            "decode_speedup_vs_fp32_onnx": {f"b{b}": round(tps[b][v.name] / tps[b][fp32.name], 2) for b in tps}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, one sparsity, fewer rounds")
    ap.add_argument("--only", choices=["cnn", "distill", "lstm", "gpt"], action="append",
                    help="run only these parts; the others keep their numbers from the last full run")
    args = ap.parse_args()
    t0 = time.perf_counter()
    import json

    parts = (("cnn_prune_int8", "cnn", "CNN: structured prune + INT8", bar_cnn_prune),
             ("distill", "distill", "distillation: KD vs no-teacher students", bar_distill),
             ("lstm", "lstm", "LSTM: pruned / distilled MAE", bar_lstm),
             ("gpt", "gpt", "GPT: pruned heads and MLP width", bar_gpt))
    res = json.loads(RESULTS.read_text()) if args.only and RESULTS.is_file() else {}
    res.update({"benchmark": "prune_distill", "machine": machine_info(),
                "note": "shared 2-core machine: other jobs ran at the same time; latencies are medians of interleaved rounds",
                "quick": args.quick})
    for key, short, label, fn in parts:
        if args.only and short not in args.only:
            continue
        print(f"{label} ...", flush=True)
        res[key] = fn(args.quick)
        res[key]["measured"] = time.strftime("%Y-%m-%d")
        res["elapsed_s"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(RESULTS, res)  # after each part, so a later failure keeps the earlier numbers
    if "gpt" in res:
        g = res["gpt"]
        print(f"\n== 4. GPT pruned (perplexity; decode tokens/s, ONNX Runtime, 1 thread) ==\nFP32 torch "
              f"{g['baseline_perplexity']:.2f}, bigram {g['bigram_perplexity']:.2f}")
        for e in g["variants"]:
            print(f"{e['variant']:40s} {e['parameters'] or 0:9,d} params {e['size_bytes']:9,d} B  ppl {e['perplexity']:7.2f} "
                  f"({e['perplexity_change']:+.2f})  tok/s b1 {e['decode_tok_s']['b1']:7.1f} "
                  f"({e['decode_speedup_vs_fp32_onnx']['b1']:.2f}x)  b8 {e['decode_tok_s']['b8']:7.1f} "
                  f"({e['decode_speedup_vs_fp32_onnx']['b8']:.2f}x)")
    if args.only and not {"cnn", "distill", "lstm"} <= set(args.only):
        print(f"\nwrote {RESULTS} in {res['elapsed_s']:.0f} s")
        return
    cnn, dist, lstm = res["cnn_prune_int8"], res["distill"], res["lstm"]
    print("\n== 1. CNN structured prune + INT8 (batch-32 p50, ONNX Runtime CPU) ==")
    print(f"{'variant':36s} {'params':>8s} {'size B':>8s} {'acc %':>6s} {'drop':>6s} "
          f"{'ms t1':>7s} {'x t1':>6s} {'ms t2':>7s} {'x t2':>6s}")
    for e in cnn["variants"]:
        print(f"{e['variant']:36s} {e['parameters'] or 0:8,d} {e['size_bytes']:8,d} {e['accuracy'] * 100:6.2f} "
              f"{e['accuracy_drop_pt']:+6.2f} {e['p50_ms']['t1_b32']:7.3f} {e['speedup_vs_fp32_onnx']['t1_b32']:6.2f} "
              f"{e['p50_ms']['t2_b32']:7.3f} {e['speedup_vs_fp32_onnx']['t2_b32']:6.2f}")
    print(f"bar met: {cnn['bar']['met']} ({', '.join(cnn['bar']['met_by']) or 'none'})")
    print("\n== 2. Distillation (held-out accuracy %, per seed) ==")
    for name, r in dist.items():
        print(f"{name}: teacher {r['teacher_accuracy'] * 100:.2f} ({r['teacher_parameters']:,} params); student "
              f"{r['student_arch']} {r['student_parameters']:,} params ({r['param_ratio']:.2f}x), {r['epochs']} epochs")
        print(f"  KD (tau 4, alpha 0.1): {[round(a * 100, 2) for a in r['kd']]} mean {r['kd_mean'] * 100:.2f}")
        print(f"  no teacher:            {[round(a * 100, 2) for a in r['scratch']]} mean {r['scratch_mean'] * 100:.2f}")
        print(f"  KD - scratch {r['kd_minus_scratch_pt']:+.2f} pt, teacher - KD {r['teacher_minus_kd_pt']:+.2f} pt, "
              f"bar met: {r['bar_met']}")
    print("\n== 3. LSTM sunspots (MAE, lower is better) ==")
    print(f"original: {lstm['baseline_mae']:.3f}")
    for e in lstm["variants"]:
        print(f"{e['variant']:32s} {e['parameters']:6,d} params  MAE {e['mae']:.3f} (ONNX {e['mae_onnx']:.3f}) "
              f"{e['relative_change'] * 100:+.1f}%  {e['what']}")
    print(f"bar met: {lstm['bar']['met']} ({', '.join(lstm['bar']['met_by']) or 'none'})")
    print(f"\nwrote {RESULTS} in {res['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
