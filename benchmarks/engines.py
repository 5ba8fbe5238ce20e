"""Engine backends against torch eager FP32: latency ratios at batch 1 and 32.

For each model (default: the CNN and the LSTM) this builds, through the variant cache,
AOTInductor packages (FP32, BF16, INT8 via PT2E), the ONNX Runtime engine (FP32 on the CPU EP,
and on the INT8 static QDQ model), and on a GPU machine also torch eager CUDA FP32/FP16, AOTInductor
on CUDA and the TensorRT engine; times each with :func:`deepship.runtimes.benchmark.measure` on
real held-out inputs and reports ``speedup = torch eager FP32 p50 / engine p50`` plus each engine's
output drift against the FP32 torch model.

Writes ``benchmarks/results/engines.json`` and prints a table. Run::

    .venv/bin/python benchmarks/engines.py [--models cnn,lstm] [--min-time 1.0] [--repeats 3]

Latency is the median over ``--repeats`` rounds of the harness's p50; each round times every engine
once (interleaved), and the speedup is the median of the per-round ratios, so a change in a shared
machine's load hits the baseline and the engines alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def _variants(ctx, gpu: bool):
    """``[(label, build callable returning (variant or None, session factory))]``."""
    from deepship import api

    out = [
        ("torch eager fp32", lambda: (ctx.baseline(), None)),
        ("inductor fp32", lambda: (api.engine(ctx, "inductor", "fp32", device="cpu"), None)),
        ("inductor bf16", lambda: (api.engine(ctx, "inductor", "bf16", device="cpu"), None)),
        ("inductor int8 (PT2E)", lambda: (api.engine(ctx, "inductor", "int8", device="cpu"), None)),
        ("onnxruntime fp32 (CPU EP)", lambda: (api.engine(ctx, "onnxruntime", "fp32"), None)),
        ("onnxruntime int8 QDQ (CPU EP)", lambda: (api.engine(ctx, "onnxruntime", "int8"), None)),
    ]
    if gpu:
        import torch

        from deepship.runtimes.session import TorchSession

        names = [t.name for t in ctx.spec.inputs]

        def eager_cuda(dtype):
            import copy

            m = copy.deepcopy(ctx.module()).to("cuda").to(dtype)
            return TorchSession(m, names, ctx.spec.output_names, dtype=dtype, device="cuda")

        out += [
            ("torch eager cuda fp32", lambda: (None, lambda: eager_cuda(torch.float32))),
            ("torch eager cuda fp16", lambda: (None, lambda: eager_cuda(torch.float16))),
            ("inductor cuda fp32", lambda: (api.engine(ctx, "inductor", "fp32", device="cuda"), None)),
            ("inductor cuda fp16", lambda: (api.engine(ctx, "inductor", "fp16", device="cuda"), None)),
            ("onnxruntime cuda fp32", lambda: (api.engine(ctx, "onnxruntime", "fp32", providers="cuda"), None)),
            ("tensorrt fp16", lambda: (api.engine(ctx, "tensorrt", "fp16"), None)),
        ]
    return out


def main() -> None:
    import numpy as np

    from deepship import api
    from deepship.errors import DeepshipError
    from deepship.pipeline.evaluate import bench_feeds, drift, eval_feeds
    from deepship.runtimes.benchmark import measure
    from deepship.runtimes.engines.tensorrt import cuda_device
    from deepship.utils import default_threads, machine_info, write_json_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,lstm")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--min-time", type=float, default=1.0, help="timed seconds per (variant, batch, repeat)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engines.json"))
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    gpu = cuda_device() is not None
    results = []
    for name in a.models.split(","):
        ctx = api.load(name)
        feeds, _, _ = eval_feeds(ctx)
        ref = None
        rows, sessions = [], []
        for label, make in _variants(ctx, gpu):
            row = {"model": name, "engine": label}
            t0 = time.perf_counter()
            try:
                v, factory = make()
                sess = factory() if factory else ctx.session(v)
                row.update({"variant": v.name if v else None, "precision": v.precision if v else label.split()[-1],
                            "provider": getattr(sess, "provider", ""), "build_s": round(time.perf_counter() - t0, 1)})
                if v is not None and v.info.get("warning"):
                    row["warning"] = v.info["warning"]
                if v is not None and v.info.get("static_dims"):
                    row["static_dims"] = v.info["static_dims"]
                out = sess.run_batched(feeds, batch_size=256)[ctx.spec.output_names[0]]
                if ref is None:
                    ref = out
                else:
                    row["drift_vs_fp32_torch"] = {k: round(x, 6) for k, x in drift(out, ref).items()}
                sessions.append((row, sess))
            except DeepshipError as e:
                row["error"] = str(e)
            except Exception as e:  # a library crash in one engine: record it, keep going
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(row)
        # interleaved: each repeat times every engine once, so a change in the machine's load hits
        # all of them alike; speedup = median over repeats of (eager p50 / engine p50)
        for b in batches:
            f = bench_feeds(ctx, b)
            p50s: dict[int, list[float]] = {i: [] for i in range(len(sessions))}
            for _ in range(a.repeats):
                for i, (row, sess) in enumerate(sessions):
                    try:
                        p50s[i].append(measure(sess, f, min_time_s=a.min_time, batch=b).p50_ms)
                    except Exception as e:
                        row[f"error_b{b}"] = str(e).splitlines()[0][:200]
            base = p50s[0]
            for i, (row, _) in enumerate(sessions):
                if not p50s[i]:
                    continue
                row[f"p50_ms_b{b}"] = round(float(np.median(p50s[i])), 4)
                row[f"speedup_b{b}"] = round(float(np.median([x / y for x, y in zip(base, p50s[i])])), 3)
        for row in rows:
            cells = [f"{row.get(f'p50_ms_b{b}', '-')} ms ({row.get(f'speedup_b{b}', '-')}x)" for b in batches]
            print(f"{name:5s} {row['engine']:32s} " + "  ".join(f"b{b}: {c:22s}" for b, c in zip(batches, cells))
                  + (f"  ERROR {row['error'][:90]}" if "error" in row else ""), flush=True)
        results += rows
    report = {"benchmark": "engines", "machine": machine_info(), "gpu": cuda_device(), "threads": default_threads(),
              "settings": {"batches": batches, "min_time_s": a.min_time, "repeats": a.repeats,
                           "shared_machine": True, "DEEPSHIP_THREADS": os.environ.get("DEEPSHIP_THREADS")},
              "speedup": "torch eager FP32 p50 / engine p50 (higher is better)",
              "results": results}
    write_json_atomic(a.out, report)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
