"""Crash safety: ``kill -9`` an ``optimize report`` at random points, rerun it, compare.

For each trial a fresh cache is seeded from nothing, ``optimize report MODEL`` starts, and at a
random moment between 0.3 s and the cold run's duration (so quantization, pruning, benchmarking and
the report writes are all hit) the process group gets SIGKILL. The same command then reruns to the
end on that cache. The rerun must exit 0 with every variant's metric identical to an uninterrupted
cold run, and no ``.tmp-*`` file or folder may survive it in the cache or the report folder.

Writes ``benchmarks/results/kill_rerun.json``. Run::

    .venv/bin/python benchmarks/kill_rerun.py [--model cnn] [--trials 20] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZE = [sys.executable, "-m", "deepship.cli"]


def run(model: str, cache: Path, out: Path, extra: list[str], kill_after: float | None = None) -> tuple[int, float]:
    env = {**os.environ, "DEEPSHIP_CACHE": str(cache)}
    t0 = time.perf_counter()
    p = subprocess.Popen([*OPTIMIZE, "report", model, "--out", str(out), *extra], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if kill_after is None:
        return p.wait(), time.perf_counter() - t0
    try:
        p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return -9, time.perf_counter() - t0
    return p.returncode, time.perf_counter() - t0


def metrics(out: Path) -> dict[str, float | None]:
    rep = json.loads((out / "report.json").read_text())
    return {f"{m['model']}/{v['variant']}": v.get("metric") for m in rep["models"] for v in m["variants"]}


def leftovers(*roots: Path) -> list[str]:
    return sorted(str(p) for r in roots if r.exists() for p in r.rglob(".tmp-*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="--min-time 0.05", help="more report options")
    args = ap.parse_args()
    extra = args.extra.split()
    work = Path(tempfile.mkdtemp(prefix="deepship-kill-"))
    rng = random.Random(args.seed)
    code, cold_s = run(args.model, work / "cache0", work / "out0", extra)
    assert code == 0, "the uninterrupted run failed"
    ref = metrics(work / "out0")
    trials = []
    for i in range(args.trials):
        cache, out = work / f"cache{i + 1}", work / f"out{i + 1}"
        t_kill = rng.uniform(0.3, cold_s)
        killed, _ = run(args.model, cache, out, extra, kill_after=t_kill)
        left_after_kill = len(leftovers(cache, out))
        code, rerun_s = run(args.model, cache, out, extra)
        got = metrics(out) if code == 0 else {}
        diff = sorted(k for k in ref if got.get(k) != ref[k])
        trials.append({"kill_at_s": round(t_kill, 2), "killed": killed == -9, "tmp_after_kill": left_after_kill,
                       "rerun_exit": code, "rerun_s": round(rerun_s, 1), "metrics_differ": diff,
                       "tmp_after_rerun": leftovers(cache, out)})
        print(json.dumps(trials[-1]), flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    ok = all(t["rerun_exit"] == 0 and not t["metrics_differ"] and not t["tmp_after_rerun"] for t in trials)
    res = {"model": args.model, "options": extra, "cold_run_s": round(cold_s, 1), "variants": len(ref),
           "trials": trials, "all_ok": ok, "killed_mid_run": sum(t["killed"] for t in trials),
           "left_tmp_after_kill": sum(t["tmp_after_kill"] > 0 for t in trials),
           "date": time.strftime("%Y-%m-%d"), "loadavg": os.getloadavg()}
    sys.path.insert(0, str(ROOT))
    from deepship.utils import machine_info, write_json_atomic

    res["machine"] = machine_info()
    write_json_atomic(ROOT / "benchmarks" / "results" / "kill_rerun.json", res)
    shutil.rmtree(work, ignore_errors=True)
    print(f"{'all ok' if ok else 'FAILURES'}: {len(trials)} trials, {res['killed_mid_run']} killed mid-run, "
          f"{res['left_tmp_after_kill']} left temp files that the rerun swept; cold run {cold_s:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
