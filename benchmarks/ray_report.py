"""``optimize report`` serial against ``--ray`` on this machine, cold cache, interleaved rounds.

Each round runs the same report twice, in alternating order, each on a fresh empty cache so every
variant is built (quantized, pruned, distilled, exported) and measured: once serially in this
process, once as Ray tasks on a local cluster (``ray.init()`` with every core; one task per model
trunk and per independent variant chain, each task given ``threads`` CPUs). Metrics of both runs
must be identical (the run fails otherwise).

From the Ray run's task wall times it also estimates the wall time on N nodes of this machine's
size: the critical path (a model's trunk plus its longest leaf chain) bounds it from below, the
total task time over all cores from the other side, plus the measured Ray start-up:
``estimate(N) = startup + max(critical_path, total_task_s / (N * cores))``. That is an estimate,
labelled so, not a measurement: it assumes the shared cache folder costs nothing and the tasks
pack perfectly.

Writes ``benchmarks/results/ray_report.json``. Run::

    .venv/bin/python benchmarks/ray_report.py [--models mlp cnn lstm gru] [--rounds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(models: list[str], ray: bool, threads: int) -> tuple[float, dict]:
    from deepship.models import resolve
    from deepship.pipeline.report import run_report

    cache = Path(tempfile.mkdtemp(prefix="ds-ray-bench-"))
    out = Path(tempfile.mkdtemp(prefix="ds-ray-out-"))
    old = os.environ.get("DEEPSHIP_CACHE")
    os.environ["DEEPSHIP_CACHE"] = str(cache)
    try:
        t0 = time.perf_counter()
        rep = run_report([resolve(m) for m in models], out_dir=out, ray=ray, show_progress=False, threads=threads)
        return time.perf_counter() - t0, rep
    finally:
        if old is None:
            os.environ.pop("DEEPSHIP_CACHE", None)
        else:
            os.environ["DEEPSHIP_CACHE"] = old
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def metrics(rep: dict) -> dict[str, object]:
    return {f"{m['model']}/{v['variant']}": (v.get("metric"), v.get("drift")) for m in rep["models"] for v in m["variants"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "lstm", "gru"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per task (and for the serial run)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "ray_report.json"))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    serial_s, ray_s, loads, est_rows = [], [], [], []
    ref = None
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for use_ray in order:
            loads.append(os.getloadavg()[0])
            wall, rep = run_once(args.models, use_ray, args.threads)
            (ray_s if use_ray else serial_s).append(wall)
            m = metrics(rep)
            if ref is None:
                ref = m
            if m != ref:
                diff = next(k for k in m if m[k] != ref.get(k))
                raise SystemExit(f"error: {'Ray' if use_ray else 'serial'} run differs from the first at {diff}")
            if use_ray:
                d = rep["distributed"]
                tasks = [t for ts in d["tasks"].values() for t in ts]
                total = sum(t.get("wall_s", 0.0) for t in tasks)
                crit = max(sum(t.get("wall_s", 0.0) for t in ts if t["kind"] == "trunk")
                           + max([t.get("wall_s", 0.0) for t in ts if t["kind"] == "leaf"] or [0.0])
                           for ts in d["tasks"].values())
                est_rows.append({"wall_s": wall, "task_total_s": total, "critical_path_s": crit,
                                 "overhead_s": max(0.0, wall - max(crit, total / cores)), "tasks": len(tasks)})
            print(f"round {r + 1} {'ray   ' if use_ray else 'serial'} {wall:7.1f} s  load {loads[-1]:.2f}")
    med = {k: statistics.median(v) for k, v in (("serial_s", serial_s), ("ray_s", ray_s))}
    e = {k: statistics.median(row[k] for row in est_rows) for k in ("task_total_s", "critical_path_s", "overhead_s")}
    estimate = {str(n): round(e["overhead_s"] + max(e["critical_path_s"], e["task_total_s"] / (n * cores)), 1)
                for n in (1, 2, 4, 8, 16)}
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
           "cpus": cores, "models": args.models, "threads_per_task": args.threads, "rounds": args.rounds,
           "cache": "cold (fresh per run)", "loadavg_before_each_run": loads,
           "serial_s": serial_s, "ray_s": ray_s, "median": med,
           "ray_over_serial": round(med["ray_s"] / med["serial_s"], 3), "metrics_identical": True,
           "ray_tasks": est_rows, "estimate_on_n_nodes_s": estimate,
           "estimate_note": "estimate, not measured: startup/overhead + max(critical path, task time / (N x cores))"}
    Path(args.results).write_text(json.dumps(res, indent=2))
    print(f"median serial {med['serial_s']:.1f} s, Ray {med['ray_s']:.1f} s (x{res['ray_over_serial']:.2f}); "
          f"estimated on N nodes: {estimate}; wrote {args.results}")


if __name__ == "__main__":
    main()
