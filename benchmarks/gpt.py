"""GPT decoder: KV cache, INT4 weights and speculative decoding against recomputation, with the
memory-bandwidth ceiling.

The issue's bars, all at batch 1 for ``--new-tokens`` (256) new tokens after held-out prompts of 64
tokens, greedy, ONNX Runtime on the CPU:

- (a) recompute without a cache (the prefill graph over the whole sequence at every step);
- (b) KV cache (decode-step graph; the default runner, numpy arrays through ``InferenceSession.run``;
  IOBinding with preallocated buffers is measured beside it);
- (c) KV cache with INT4 weight-only MatMulNBits weights (block 32 and 128);
- (d) speculative decoding, ``gpt-draft`` (INT8 dynamic ONNX: a draft's precision changes only which
  tokens it proposes, never the output) drafting for the FP32 target, at each ``k``; its output must
  equal (b)'s token for token. The draft's ``k`` greedy proposals are one call of its unrolled proposal
  graph (``ArrayKVRunner.propose``); beside it: the FP32 draft (``speculative_fp32_draft_k*``) and the
  INT8 draft called ``k`` times (``speculative_step_draft_k4``).

Targets: (b) >= 5x (a); (d) at its best k >= 1.8x (b); INT4 file <= 0.35x the FP32 file. Also:
INT8 dynamic, KV cache through plain ``session.run`` (no IOBinding) and PyTorch eager, batch 8,
held-out perplexity of every variant, acceptance rates in sampling mode, and the memory-bandwidth
ceiling: bytes read per decode step (weights, except the embedding rows a ``Gather`` does not read,
plus the KV cache at the mean length) divided by this machine's bandwidth measured with a large
numpy copy gives the highest possible tokens/s; each variant's fraction of it is reported. On a CPU
with a large L3 cache (32 MB here) a few-MB model is served from the cache, not from DRAM, so the
fraction can exceed 1.

Tokens/s counts every new token over the whole call (prefill of the prompt + decode); the
decode-phase rate (prefill excluded) is given beside it. Each configuration runs ``--repeats`` times
per prompt; the median is reported. Writes ``benchmarks/results/gpt.json`` and ``gpt.md``. Run::

    DEEPSHIP_CACHE=/tmp/gpt-cache .venv/bin/python benchmarks/gpt.py [--prompts 3] [--repeats 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def memory_bandwidth(mb: int = 512, repeats: int = 5) -> dict:
    """Copy bandwidth of a large numpy array (``np.copyto``, ``mb`` MiB, best of ``repeats``).

    Returns ``{"copy_gb_s": (read + write bytes) / s, "read_gb_s": read bytes / s}`` in GB/s (1e9).
    """
    n = mb * 2**20 // 8
    src = np.ones(n, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return {"array_mib": mb, "copy_gb_s": 2 * src.nbytes / best / 1e9, "read_gb_s": src.nbytes / best / 1e9}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_step_bytes(onnx_path: Path, layout, past_len: float, batch: int = 1) -> dict:
    """Bytes one decode step must read: every initializer, except those only ``Gather`` reads (the
    token and position embeddings: one row each per token), plus the KV cache at ``past_len``."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    users: dict[str, set] = {}
    for node in m.graph.node:
        for i in node.input:
            users.setdefault(i, set()).add(node.op_type)
    weights = gathered = 0
    for init in m.graph.initializer:
        nbytes = numpy_helper.to_array(init).nbytes
        if users.get(init.name) == {"Gather"}:
            gathered += nbytes
        else:
            weights += nbytes
    kv = layout.cache_bytes(batch, int(past_len))
    return {"weight_bytes": weights, "gather_only_bytes": gathered, "kv_bytes": kv, "total": weights + kv}


def run_configs(configs: dict, prompts: np.ndarray, repeats: int, once: set = frozenset()) -> dict:
    """Run every configuration on every prompt, round-robin (config inside prompt inside repeat), so
    that load changes on a shared machine hit all configurations alike. Configurations in ``once`` run
    in the first repeat only. Returns per configuration the medians of tokens/s (end to end and
    decode phase) and prefill ms, the first repeat's outputs, and the acceptance rate. Every
    configuration not in ``once`` runs once on the first prompt untimed first."""
    acc: dict = {k: {"tps": [], "dtps": [], "prefill": [], "outputs": [], "acc": [], "calls": []} for k in configs}
    for label, fn in configs.items():  # warm-up (untimed): sessions, the draft's fused proposal graphs
        if label not in once:
            fn(prompts[0])
    for r in range(repeats):
        for i, p in enumerate(prompts):
            for label, fn in configs.items():
                if r and label in once:
                    continue
                res = fn(p)
                a = acc[label]
                a["tps"].append(res.tokens_per_s)
                a["dtps"].append(res.decode_tok_s if res.decode_ms else float("nan"))
                a["prefill"].append(res.prefill_ms)
                if r == 0:
                    a["outputs"].append(res.row(0).tolist())
                    a["calls"].append(res.target_calls)
                    if res.proposed:
                        a["acc"].append((res.accepted, res.proposed, res.rejected, res.target_calls, res.new_tokens))
    out = {}
    for label, a in acc.items():
        o = {"tokens_per_s": float(np.median(a["tps"])), "decode_tokens_per_s": float(np.median(a["dtps"])),
             "prefill_ms": float(np.median(a["prefill"])), "runs": len(a["tps"]), "outputs": a["outputs"],
             "target_calls_per_prompt": float(np.mean(a["calls"])),
             "tokens_per_s_all": [round(x, 1) for x in a["tps"]]}
        if a["acc"]:
            acc_, prop, rej, rounds, toks = (sum(x[i] for x in a["acc"]) for i in range(5))
            o["acceptance_rate"] = acc_ / max(1, prop)  # accepted / proposed
            o["token_acceptance"] = acc_ / max(1, acc_ + rej)  # per-token alpha estimate
            o["tokens_per_round"] = toks / max(1, rounds)
            o["acceptance_per_prompt"] = [round(x[0] / max(1, x[1]), 3) for x in a["acc"]]
        out[label] = o
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=3, help="held-out prompts (64 tokens each)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ks", default="1,2,3,4,5,6,8,10", help="speculative k values")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: fastest for batch-1 decoding of this model on a shared 2-core machine)")
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpt.json"))
    args = ap.parse_args()

    from deepship import api
    from deepship.models import gpt as G
    from deepship.pipeline.arch import gpt as AG
    from deepship.runtimes import generate as R
    from deepship.runtimes import kvcache as K
    from deepship.runtimes.kvcache import KVLayout
    from deepship.runtimes.sampling import Sampling
    from deepship.runtimes.session import OrtSession
    from deepship.utils import default_threads, machine_info, write_json_atomic, write_text_atomic

    threads = args.threads or default_threads()
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    ctx, dctx = api.load("gpt"), api.load("gpt-draft")
    cfg, dcfg = G.config_of(ctx.spec), G.config_of(dctx.spec)
    layout = KVLayout.of(cfg)
    log("building variants (cached after the first run) ...")
    V = {n: AG.build_variant(ctx, n) for n in ("fp32-torch", "fp32-onnx", "int8-dynamic", "int4-b32", "int4-b128")}
    dv = AG.build_variant(dctx, "int8-dynamic")
    dv32 = AG.build_variant(dctx, "fp32-onnx")
    sess = {n: ctx.session(v, threads=threads) for n, v in V.items()}
    prefill_fp32 = OrtSession(Path(V["fp32-onnx"].dir) / "prefill.onnx", threads=threads)

    def runner(name: str, mode: str = "auto"):
        return AG.variant_runner(ctx, V[name], sess[name], mode=mode)

    draft_runner = AG.variant_runner(dctx, dv, threads=threads)
    draft32 = AG.variant_runner(dctx, dv32, threads=threads)
    step_draft = K.ArrayKVRunner(draft_runner.session, draft_runner.layout, draft_runner.prefill_session,
                                 fuse_proposals=False)
    prompts = G.heldout_prompts(args.prompts, G.REPORT_PROMPT_TOKENS)
    n = args.new_tokens
    res: dict = {}

    rec = K.RecomputeRunner(prefill_fp32, layout)
    kv = runner("fp32-onnx")
    kv_io = runner("fp32-onnx", "iobinding")
    kv_torch = runner("fp32-torch")
    quant = {q: runner(q) for q in ("int8-dynamic", "int4-b32", "int4-b128")}
    int4 = quant["int4-b32"]
    ks = [int(x) for x in args.ks.split(",")]
    configs = {
        "a_recompute_fp32_onnx": lambda p: R.generate(rec, p, n),
        "b_kv_cache_fp32_onnx": lambda p: R.generate(kv, p, n),
        "kv_cache_fp32_onnx_iobinding": lambda p: R.generate(kv_io, p, n),
        "kv_cache_fp32_torch_eager": lambda p: R.generate(kv_torch, p, n),
        "kv_cache_int8_dynamic": lambda p: R.generate(quant["int8-dynamic"], p, n),
        "c_kv_cache_int4_b32": lambda p: R.generate(quant["int4-b32"], p, n),
        "c_kv_cache_int4_b128": lambda p: R.generate(quant["int4-b128"], p, n),
        **{f"d_speculative_k{k}": (lambda p, k=k: R.speculative_generate(kv, draft_runner, p, n, k=k)) for k in ks},
        "speculative_step_draft_k4": lambda p: R.speculative_generate(kv, step_draft, p, n, k=4),
        **{f"speculative_fp32_draft_k{k}": (lambda p, k=k: R.speculative_generate(kv, draft32, p, n, k=k))
           for k in (4, 8)},
        **{f"speculative_int4_b32_target_k{k}": (lambda p, k=k: R.speculative_generate(int4, draft_runner, p, n, k=k))
           for k in (3, 4)},
        **{f"speculative_sampling_t1_k{k}": (lambda p, k=k: R.speculative_generate(
            kv, draft_runner, p, n, k=k, sampling=Sampling(greedy=False, temperature=1.0, seed=0))) for k in (2, 4)},
    }
    log(f"running {len(configs)} configurations x {len(prompts)} prompts x {args.repeats} repeats (round-robin) ...")
    res.update(run_configs(configs, prompts, args.repeats, once={"a_recompute_fp32_onnx", "kv_cache_fp32_torch_eager"}))
    if threads == 1:  # the same KV-cache loop with 2 intra-op threads, for comparison
        s2 = ctx.session(V["fp32-onnx"], threads=2)
        kv2 = AG.variant_runner(ctx, V["fp32-onnx"], s2)
        res.update(run_configs({"kv_cache_fp32_onnx_2_threads": lambda p: R.generate(kv2, p, n)}, prompts[:1], 1))
    # batch 8 with the KV cache (8 held-out prompts of equal length)
    p8 = G.heldout_prompts(8, G.REPORT_PROMPT_TOKENS)
    res.update(run_configs({f"batch8_kv_cache_{q.replace('-', '_')}": (lambda p, r=r: R.generate(r, p8, n))
                            for q, r in (("fp32-onnx", kv), ("int4-b32", int4))}, prompts[:1], args.repeats))
    for label, v in res.items():
        log(f"  {label}: {v['tokens_per_s']:.1f} tokens/s")

    # identical greedy output
    ref = res["b_kv_cache_fp32_onnx"]["outputs"]
    for key, val in res.items():  # the FP32 configurations must reproduce (b) token for token
        fp32 = key.startswith(("a_", "b_", "kv_cache_fp32", "d_", "speculative_step", "speculative_fp32"))
        val["same_tokens_as_b"] = val["outputs"] == ref[: len(val["outputs"])] if fp32 else None
    best_k = max(ks, key=lambda k: res[f"d_speculative_k{k}"]["tokens_per_s"])

    def paired(label: str) -> float:  # median over (repeat, prompt) of this run's tokens/s over (b)'s same run
        x, y = res[label]["tokens_per_s_all"], res["b_kv_cache_fp32_onnx"]["tokens_per_s_all"]
        return float(np.median(np.asarray(x) / np.asarray(y[: len(x)])))


    # sizes
    def size(v):  # the decode graph with its weights (the FP32 artifact also holds the prefill graph)
        return v.size_bytes() if v.name != "fp32-onnx" else sum(
            (Path(v.dir) / f).stat().st_size for f in v.files if f != "prefill.onnx")

    sizes = {name: size(v) for name, v in V.items() if name != "fp32-torch"}

    # memory-bandwidth ceiling at batch 1
    bw = memory_bandwidth()
    mean_past = G.REPORT_PROMPT_TOKENS + n / 2
    ceiling = {}
    for name, key in (("fp32-onnx", "b_kv_cache_fp32_onnx"), ("int8-dynamic", "kv_cache_int8_dynamic"),
                      ("int4-b32", "c_kv_cache_int4_b32"), ("int4-b128", "c_kv_cache_int4_b128")):
        by = decode_step_bytes(V[name].path, layout, mean_past)
        top = bw["copy_gb_s"] * 1e9 / by["total"]
        ceiling[name] = {**by, "ceiling_tokens_per_s": top, "decode_tokens_per_s": res[key]["decode_tokens_per_s"],
                         "fraction_of_ceiling": res[key]["decode_tokens_per_s"] / top}
    # perplexity
    ppl = {}
    if not args.skip_perplexity:
        log("perplexity on all held-out tokens ...")
        for name in V:
            ppl[name] = G.perplexity(sess[name], cfg)
            log(f"  {name}: {ppl[name]:.3f}")
        ppl["gpt-draft fp32-torch"] = G.perplexity(dctx.session(dctx.baseline(), threads=threads), dcfg)
        ppl["bigram"] = G.bigram_baseline()["value"]

    a = res["a_recompute_fp32_onnx"]["tokens_per_s"]
    b = res["b_kv_cache_fp32_onnx"]["tokens_per_s"]
    d = res[f"d_speculative_k{best_k}"]["tokens_per_s"]
    bars = {
        "b_over_a": b / a, "b_over_a_target": 5.0,
        "d_over_b": d / b, "d_over_b_target": 1.8, "best_k": best_k,
        "d_over_b_paired_median": paired(f"d_speculative_k{best_k}"),
        "d_identical_to_b": all(res[f"d_speculative_k{k}"]["same_tokens_as_b"] for k in ks),
        "c_int4_b32_over_b": res["c_kv_cache_int4_b32"]["tokens_per_s"] / b,
        "int4_b32_size_ratio": sizes["int4-b32"] / sizes["fp32-onnx"],
        "int4_b128_size_ratio": sizes["int4-b128"] / sizes["fp32-onnx"], "int4_size_ratio_target": 0.35,
    }
    for v in res.values():
        v.pop("outputs", None)
    report = {
        "machine": machine_info(), "shared_machine": True, "load_average_start": load0, "load_average_end": os.getloadavg(),
        "threads": threads, "new_tokens": n, "prompt_tokens": G.REPORT_PROMPT_TOKENS, "prompts": len(prompts),
        "repeats": args.repeats, "model": {"target": cfg.to_dict(), "draft": dcfg.to_dict(),
                                            "target_parameters": sum(p.numel() for p in ctx.module().parameters()),
                                            "draft_parameters": sum(p.numel() for p in dctx.module().parameters())},
        "bars": bars, "configs": res, "sizes_bytes": sizes, "bandwidth": bw, "bandwidth_ceiling_b1": ceiling,
        "perplexity": ppl, "elapsed_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    write_json_atomic(out, report)
    md = to_markdown(report)
    write_text_atomic(out.with_suffix(".md"), md)
    print(md)


def to_markdown(r: dict) -> str:
    b = r["bars"]
    lines = [f"GPT decoder benchmark: {r['new_tokens']} new tokens after {r['prompts']} held-out prompts of "
             f"{r['prompt_tokens']} tokens, greedy, {r['threads']} threads, {r['machine']['cpu']} "
             f"({r['machine']['logical_cores']} cores, shared: load average {r['load_average_start'][0]:.1f} at start, "
             f"{r['load_average_end'][0]:.1f} at end).", "",
             "| configuration | tokens/s | decode tokens/s | prefill ms | accepted/proposed | per-token acceptance | "
             "tokens per target pass | same tokens as (b) |",
             "|---|---|---|---|---|---|---|---|"]
    for k, v in r["configs"].items():
        acc = f"{v['acceptance_rate']:.2f}" if "acceptance_rate" in v else "-"
        alpha = f"{v['token_acceptance']:.2f}" if "token_acceptance" in v else "-"
        tpr = f"{v['tokens_per_round']:.2f}" if "tokens_per_round" in v else "-"
        same = {True: "yes", False: "NO", None: "-"}[v.get("same_tokens_as_b")]
        lines.append(f"| {k} | {v['tokens_per_s']:.1f} | {v['decode_tokens_per_s']:.1f} | {v['prefill_ms']:.1f} | {acc} | "
                     f"{alpha} | {tpr} | {same} |")
    lines += ["", "| bar | measured | target |", "|---|---|---|",
              f"| (b) KV cache / (a) recompute | {b['b_over_a']:.2f}x | >= {b['b_over_a_target']}x |",
              f"| (d) speculative (best k={b['best_k']}) / (b) | {b['d_over_b']:.2f}x (median of paired runs: "
              f"{b['d_over_b_paired_median']:.2f}x) | >= {b['d_over_b_target']}x, identical output: "
              f"{'yes' if b['d_identical_to_b'] else 'NO'} |",
              f"| (c) INT4 b32 / (b) | {b['c_int4_b32_over_b']:.2f}x | - |",
              f"| INT4 b32 file / FP32 file | {b['int4_b32_size_ratio']:.3f} | <= {b['int4_size_ratio_target']} |",
              f"| INT4 b128 file / FP32 file | {b['int4_b128_size_ratio']:.3f} | <= {b['int4_size_ratio_target']} |",
              "", f"Memory bandwidth (numpy copy of {r['bandwidth']['array_mib']} MiB): {r['bandwidth']['copy_gb_s']:.1f} GB/s "
              f"read+write ({r['bandwidth']['read_gb_s']:.1f} GB/s read).", "",
              "| variant | bytes read per decode step | ceiling tokens/s | measured decode tokens/s | fraction |",
              "|---|---|---|---|---|"]
    for k, v in r["bandwidth_ceiling_b1"].items():
        lines.append(f"| {k} | {v['total']:,} | {v['ceiling_tokens_per_s']:.0f} | {v['decode_tokens_per_s']:.1f} | "
                     f"{v['fraction_of_ceiling']:.2f} |")
    if r["perplexity"]:
        base = r["perplexity"].get("fp32-torch")
        lines += ["", "| model / variant | held-out perplexity | change vs FP32 torch |", "|---|---|---|"]
        for k, v in r["perplexity"].items():
            ch = f"{v - base:+.3f} ({(v - base) / base * 100:+.2f}%)" if base and not k.startswith(("gpt-draft", "bigram")) else "-"
            lines.append(f"| {k} | {v:.3f} | {ch} |")
    lines += ["", "Sizes (bytes): " + ", ".join(f"{k} {v:,}" for k, v in r["sizes_bytes"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
