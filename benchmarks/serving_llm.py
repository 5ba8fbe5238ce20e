"""Serving the GPT decoder like an LLM server: continuous batching, the KV-cache pool, fused attention.

What it measures (traffic to 127.0.0.1 only; every part bounded in requests or seconds):

1. **Throughput and latency at 32 streaming clients** (``optimize serve`` as a subprocess, the
   trained ``gpt``; clients in this process, asyncio over raw sockets, one SSE stream each):
   - ``today``: the 32 requests one at a time against ``fp32-onnx`` (the per-request loop over the
     plain KV-cache graphs, as every decoder was served before continuous batching);
   - ``batched``: the same 32 requests at once against ``fp32-onnx-fused`` (continuous batching);
   - ``single``: one client at a time against ``fp32-onnx-fused`` (the inter-token latency baseline).
   A warm-up pass, then interleaved rounds; aggregate generated tokens/s = all new tokens / wall time; p50/p99 time to
   first token and inter-token latency (client-side, per SSE event: a client that falls behind gets
   several tokens in one event, whose gap counts once per token, spread evenly). Every greedy
   answer is checked token for token against the direct loop
   (:func:`deepship.runtimes.generate.generate` over the same graph at batch 1, in this process).
   Prompts: 32 held-out windows of tiny-shakespeare of 8 to 200 tokens; 128 new tokens each.
2. **Overload**: ``--kv-slots 32 --max-queue-size 8`` and 2 x (slots + queue) clients sending
   requests in a loop for ``--overload-s`` seconds (default 60): every answer must be 200 or 503 with
   Retry-After, every 200 the direct loop's tokens, and the server's resident memory (VmRSS,
   sampled every 0.2 s) flat.
3. **Fused attention on prefill** (in this process): the plain prefill graph, the fused graph in
   one pass and in 128-token chunks (what the server does), and PyTorch eager (SDPA), at prompt
   lengths 32 .. 383 (the context is 384), ``--threads`` intra-op threads, interleaved rounds,
   median; plus the max |logits| difference of fused against plain.
4. **Speculative decoding with batching**: one greedy request with ``speculative: true`` (draft
   ``gpt-draft`` fp32-onnx, k=4) against the fused target, alone and while 31 batched clients run,
   against the same request without it.
5. **LoRA adapters served unmerged**: the report's ``lora-python-docs`` adapter on the fused
   decoder (``--adapter``); 32 clients, every other one asking for it, against all 32 on the base
   model; the base rows must stay the direct loop's.

Writes ``benchmarks/results/serving_llm.json``. Run from the repository root::

    .venv/bin/python benchmarks/serving_llm.py                  # ~4 min
    .venv/bin/python benchmarks/serving_llm.py --overload-s 10 --rounds 1
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loadtest import RssSampler, Server  # noqa: E402


async def sse_request(port: int, model: str, body: dict, timeout: float = 120.0) -> dict:
    """One ``/generate_stream`` request over a raw socket: ``{"status", "tokens", "t_send", "events":
    [(t, n_tokens)], "final", "retry_after"}`` (times from ``time.perf_counter``)."""
    t_send = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(f"POST /v2/models/{model}/generate_stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    await writer.drain()
    out = {"status": 0, "tokens": [], "t_send": t_send, "events": [], "final": None, "retry_after": None}
    try:
        status_line = await asyncio.wait_for(reader.readline(), timeout)
        out["status"] = int(status_line.split()[1])
        while True:  # headers
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"retry-after:"):
                out["retry_after"] = line.split(b":", 1)[1].strip().decode()
        if out["status"] != 200:
            return out
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                break
            if line.startswith(b"data: "):
                ev = json.loads(line[6:])
                if ev.get("final") or "error" in ev:
                    out["final"] = ev
                    break
                out["events"].append((time.perf_counter(), len(ev["tokens"])))
                out["tokens"] += ev["tokens"]
    finally:
        writer.close()
    return out


def latencies(results: list[dict]) -> dict:
    """TTFT (first event - send) and inter-token gaps (an event of n tokens after a gap g: n gaps g/n)."""
    ttft, itl = [], []
    for r in results:
        if not r["events"]:
            continue
        ttft.append(r["events"][0][0] - r["t_send"])
        for (t0, _), (t1, n) in zip(r["events"], r["events"][1:]):
            itl += [(t1 - t0) / n] * n
    q = lambda a, p: round(float(np.percentile(a, p)) * 1e3, 3) if a else None  # noqa: E731
    return {"ttft_p50_ms": q(ttft, 50), "ttft_p99_ms": q(ttft, 99), "itl_p50_ms": q(itl, 50), "itl_p99_ms": q(itl, 99)}


async def run_clients(port: int, model: str, prompts: list[str], max_tokens: int, concurrent: bool,
                      extra: dict | None = None) -> tuple[float, list[dict]]:
    bodies = [{"text_input": p, "parameters": {"max_tokens": max_tokens, **(extra or {})}} for p in prompts]
    t0 = time.perf_counter()
    if concurrent:
        res = await asyncio.gather(*(sse_request(port, model, b) for b in bodies))
    else:
        res = [await sse_request(port, model, b) for b in bodies]
    return time.perf_counter() - t0, list(res)


def summarize(wall: float, res: list[dict], refs: list[list[int]]) -> dict:
    n = sum(len(r["tokens"]) for r in res)
    ok = sum(r["status"] == 200 and r["tokens"] == ref for r, ref in zip(res, refs))
    return {"wall_s": round(wall, 3), "new_tokens": n, "tokens_per_s": round(n / wall, 1), "identical_to_direct": ok,
            "requests": len(res), **latencies(res)}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_report(tmp: Path, vs: dict) -> Path:
    models = [{"model": name, "inputs": [str(t) for t in c.spec.inputs],
               "variants": [{"variant": vn, "format": "onnx", "status": "ok", "precision": "fp32", "artifact": str(v.path)}
                            for vn, v in variants.items()]} for name, (c, variants) in vs.items()]
    p = tmp / "report.json"
    p.write_text(json.dumps({"schema_version": 1, "models": models}))
    return p


def prefill_bench(ctx, fused_v, plain_v, threads: int, rounds: int) -> dict:
    import torch

    from deepship.models import gpt as G
    from deepship.runtimes.kvcache import KVLayout
    from deepship.runtimes.kvpool import KVPool
    from deepship.runtimes.session import OrtSession

    cfg = G.config_of(ctx.spec)
    layout = KVLayout.of(cfg)
    plain = OrtSession(Path(plain_v.dir) / "prefill.onnx", threads=threads)
    pool = KVPool(OrtSession(fused_v.path, threads=threads), layout, 1)
    module = ctx.torch_session(ctx.baseline()).module.eval()
    torch.set_num_threads(threads)
    ids_all = G.heldout_prompts(1, cfg.context - 1)

    def fused_pass(ids, chunk):
        pool.lengths[0] = 0
        out = None
        for a in range(0, ids.shape[1], chunk):
            out = pool.run(0, ids[:, a:a + chunk])
        return out

    def timed(fn, n=15):
        time.sleep(0.05)  # the previous session's intra-op threads stop spinning first (they slowed the next one)
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts)) * 1e3

    rows = []
    for s in (32, 64, 128, 256, 383):
        ids = np.ascontiguousarray(ids_all[:, :s])
        t = {"plain": [], "fused": [], "fused_chunk128": [], "torch_sdpa": []}
        with torch.inference_mode():
            fns = {"plain": lambda: plain.run({"input_ids": ids}), "fused": lambda: fused_pass(ids, s),
                   "fused_chunk128": lambda: fused_pass(ids, 128), "torch_sdpa": lambda: module(torch.from_numpy(ids))}
            order = list(fns)
            for r in range(rounds):  # interleaved, the order rotated each round
                for k in order[r % 4:] + order[:r % 4]:
                    t[k].append(timed(fns[k]))
            ref = plain.run({"input_ids": ids})["logits"]
            diff = float(np.abs(fused_pass(ids, s) - ref).max())
            diff_c = float(np.abs(fused_pass(ids, 128)[0, -1] - ref[0, -1]).max())
        med = {k: round(float(np.median(v)), 3) for k, v in t.items()}
        rows.append({"prompt_tokens": s, "ms": med, "fused_speedup": round(med["plain"] / med["fused"], 2),
                     "fused_chunk128_speedup": round(med["plain"] / med["fused_chunk128"], 2),
                     "torch_sdpa_speedup": round(med["plain"] / med["torch_sdpa"], 2),
                     "max_abs_logits_fused_vs_plain": diff, "max_abs_last_logits_chunked_vs_plain": diff_c})
    return {"threads": threads, "rounds": rounds, "rows": rows}


async def overload(port: int, model: str, prompts: list[str], refs: list[list[int]], clients: int, seconds: float,
                   max_tokens: int) -> dict:
    counts = {"200": 0, "503": 0, "other": 0, "wrong": 0, "no_retry_after": 0}
    t_end = time.perf_counter() + seconds

    async def client(i: int):
        j = i
        while time.perf_counter() < t_end:
            k = j % len(prompts)
            r = await sse_request(port, model, {"text_input": prompts[k], "parameters": {"max_tokens": max_tokens}})
            j += clients
            if r["status"] == 200:
                counts["200"] += 1
                counts["wrong"] += int(r["tokens"] != refs[k][:max_tokens])
            elif r["status"] == 503:
                counts["503"] += 1
                counts["no_retry_after"] += int(not r["retry_after"])
                await asyncio.sleep(0.05)  # a polite client would wait Retry-After (1 s); this one presses on
            else:
                counts["other"] += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--overload-s", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for the prefill benchmark")
    ap.add_argument("--server-threads", type=int, default=None, help="optimize serve --threads (default: its own)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving_llm.json"))
    args = ap.parse_args()

    import tempfile

    from deepship import api
    from deepship.models import gpt as G
    from deepship.pipeline.arch import gpt as AG
    from deepship.runtimes.generate import generate
    from deepship.runtimes.kvcache import KVLayout, make_runner
    from deepship.runtimes.kvpool import FusedRunner
    from deepship.runtimes.session import OrtSession

    ctx, dctx = api.load("gpt"), api.load("gpt-draft")
    fused_v, plain_v = AG.build_variant(ctx, "fp32-onnx-fused"), AG.build_variant(ctx, "fp32-onnx")
    draft_v = AG.build_variant(dctx, "fp32-onnx")
    layout = KVLayout.of(G.config_of(ctx.spec))
    rng = np.random.default_rng(0)
    windows = G.heldout_prompts(args.clients, 200)
    prompts = [G.decode(w[: int(n)].tolist()) for w, n in zip(windows, rng.integers(8, 201, args.clients))]
    direct = FusedRunner(OrtSession(fused_v.path, threads=1), layout)
    refs = [generate(direct, G.encode(p), args.max_tokens).row(0).tolist() for p in prompts]
    plain_direct = make_runner(OrtSession(plain_v.path, threads=1), layout,
                               OrtSession(Path(plain_v.dir) / "prefill.onnx", threads=1))
    refs_plain = [generate(plain_direct, G.encode(p), args.max_tokens).row(0).tolist() for p in prompts]

    out: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                             "python": platform.python_version()},
                 "date": time.strftime("%Y-%m-%d %H:%M"), "clients": args.clients, "max_tokens": args.max_tokens,
                 "prompt_tokens": [len(G.encode(p)) for p in prompts],
                 "direct_fused_equals_direct_plain": sum(a == b for a, b in zip(refs, refs_plain))}
    tmp = Path(tempfile.mkdtemp(prefix="serving-llm-"))
    report = write_report(tmp, {"gpt": (ctx, {"fp32-onnx": plain_v, "fp32-onnx-fused": fused_v}),
                                     "gpt-draft": (dctx, {"fp32-onnx": draft_v})})

    # 1. today vs batched vs single, interleaved rounds
    sthreads = ["--threads", str(args.server_threads)] if args.server_threads else []
    srv = Server([str(report), "--kv-slots", str(args.clients), *sthreads])
    try:
        out["server_ready_s"] = round(srv.ready_s, 2)
        rounds = {"today": [], "batched": [], "single": []}
        for model, conc in (("gpt-fp32-onnx", False), ("gpt-fp32-onnx-fused", True)):  # warm-up, not counted
            asyncio.run(run_clients(srv.port, model, prompts[:8], 16, conc))
        out["load_before"] = loadavg()
        for _ in range(args.rounds):
            for kind, model, conc in (("today", "gpt-fp32-onnx", False), ("batched", "gpt-fp32-onnx-fused", True),
                                      ("single", "gpt-fp32-onnx-fused", False)):
                wall, res = asyncio.run(run_clients(srv.port, model, prompts, args.max_tokens, conc))
                rounds[kind].append(summarize(wall, res, refs if model != "gpt-fp32-onnx" else refs_plain))
        out["load_after"] = loadavg()
        out["rounds"] = rounds
        best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in rounds.items()}
        med = {k: float(np.median([r["tokens_per_s"] for r in v])) for k, v in rounds.items()}
        out["throughput_ratio_batched_vs_today"] = round(med["batched"] / med["today"], 2)
        out["itl_p99_ratio_batched_vs_single"] = round(
            float(np.median([r["itl_p99_ms"] for r in rounds["batched"]]))
            / float(np.median([r["itl_p99_ms"] for r in rounds["single"]])), 2)
        out["all_batched_identical"] = all(r["identical_to_direct"] == r["requests"] for r in rounds["batched"])
        out["best"] = best

        # 4. speculative decoding beside the batch
        spec = {}
        body = {"speculative": True, "draft": "gpt-draft-fp32-onnx"}
        for label, extra in (("plain", {}), ("speculative", body)):
            wall, res = asyncio.run(run_clients(srv.port, "gpt-fp32-onnx-fused", prompts[:4], args.max_tokens, False, extra))
            spec[f"alone_{label}"] = summarize(wall, res, refs[:4])

        async def beside(extra):
            batch = asyncio.gather(*(sse_request(srv.port, "gpt-fp32-onnx-fused",
                                                 {"text_input": p, "parameters": {"max_tokens": args.max_tokens}})
                                     for p in prompts[1:]))
            await asyncio.sleep(0.05)
            one = await run_clients(srv.port, "gpt-fp32-onnx-fused", prompts[:1], args.max_tokens, False, extra)
            await batch
            return one

        for label, extra in (("plain", {}), ("speculative", body)):
            wall, res = asyncio.run(beside(extra))
            spec[f"beside_batch_{label}"] = summarize(wall, res, refs[:1])
        out["speculative"] = spec
    finally:
        srv.stop()

    # 5. LoRA adapters served unmerged: half the 32 clients ask for the report's python-docs adapter
    adapter_dir = Path(ctx.build_planned("lora-python-docs", AG.plan(ctx.spec, [])).dir) / "adapter"
    srv = Server([str(report), "--kv-slots", str(args.clients), "--model", "gpt", "--adapter",
                  f"python-docs={adapter_dir}", *sthreads])
    try:
        lora = {"adapter": str(adapter_dir), "rounds": []}
        asyncio.run(run_clients(srv.port, "gpt-fp32-onnx-fused", prompts[:8], 16, True))  # warm-up

        async def mixed():
            t0 = time.perf_counter()
            res = await asyncio.gather(*(sse_request(srv.port, "gpt-fp32-onnx-fused", {
                "text_input": p, "parameters": {"max_tokens": args.max_tokens, **({"adapter": "python-docs"} if i % 2 else {})}})
                for i, p in enumerate(prompts)))
            return time.perf_counter() - t0, list(res)

        for _ in range(args.rounds):
            wall, res = asyncio.run(run_clients(srv.port, "gpt-fp32-onnx-fused", prompts, args.max_tokens, True))
            base = summarize(wall, res, refs)
            wall, res = asyncio.run(mixed())
            lora["rounds"].append({"all_base_tokens_per_s": base["tokens_per_s"],
                                   "half_adapter_tokens_per_s": round(sum(len(r["tokens"]) for r in res) / wall, 1),
                                   "base_rows_identical": sum(r["tokens"] == ref for r, ref in zip(res[::2], refs[::2])),
                                   "adapter_rows_differ_from_base": sum(r["tokens"] != ref for r, ref in zip(res[1::2], refs[1::2]))})
        out["adapters"] = lora
    finally:
        srv.stop()

    # 2. overload at 2x capacity
    queue = 8
    srv = Server([str(report), "--kv-slots", str(args.clients), "--max-queue-size", str(queue), "--model", "gpt", *sthreads])
    try:
        sampler = RssSampler(srv.proc.pid, 0.2)
        sampler.start()
        clients = 2 * (args.clients + queue)
        t0 = time.perf_counter()
        counts = asyncio.run(overload(srv.port, "gpt-fp32-onnx-fused", prompts, refs, clients, args.overload_s, 32))
        rss = sampler.stop()
        n = len(rss)
        out["overload"] = {"clients": clients, "kv_slots": args.clients, "max_queue": queue, "seconds": round(time.perf_counter() - t0, 1),
                           "max_tokens": 32, **counts, "rss_mib_first_10s_max": round(max(rss[: min(n, 50)]), 1),
                           "rss_mib_last_10s_max": round(max(rss[-50:]), 1), "rss_mib_max": round(max(rss), 1),
                           "load_after": loadavg()}
    finally:
        srv.stop()

    # 3. prefill: plain vs fused vs torch SDPA
    out["prefill"] = prefill_bench(ctx, fused_v, plain_v, args.threads, 4)
    out["load_end"] = loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("throughput_ratio_batched_vs_today", "itl_p99_ratio_batched_vs_single",
                                          "all_batched_identical", "best", "overload")}, indent=1))
    for r in out["prefill"]["rows"]:
        print(r["prompt_tokens"], r["ms"], r["fused_speedup"], r["fused_chunk128_speedup"], r["torch_sdpa_speedup"])
    print("speculative", json.dumps(out["speculative"], indent=1))
    print("adapters", json.dumps(out["adapters"], indent=1))


if __name__ == "__main__":
    main()
