"""kill -9 in the middle of `optimize report`, then rerun: identical metrics, no temporary files left
(issue 20; benchmarks/kill_rerun.py does the same 20 times on the full `optimize report cnn`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"


def _report(tmp: Path, cache: Path, out: Path, kill_after: float | None = None) -> int:
    env = {**os.environ, "DEEPSHIP_CACHE": str(cache), "PYTHONPATH": str(FIXTURES)}
    cmd = [sys.executable, "-m", "deepship.cli", "report", "user_models:make_net", "--input", "x:float32[batch,8]",
           "--data", str(tmp / "d.npz"), "--methods", "int8-static,fp16,int4-weight-only", "--batches", "1",
           "--min-time", "0.01", "--out", str(out)]
    p = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    if kill_after is None:
        return p.wait(timeout=300)
    try:
        return p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return -9


def _metrics(out: Path) -> dict:
    rep = json.loads((out / "report.json").read_text())
    return {v["variant"]: v["metric"] for m in rep["models"] for v in m["variants"]}


def test_killed_report_reruns_to_the_same_metrics_and_leaves_no_temp_files(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((200, 8)).astype(np.float32), targets=rng.integers(0, 3, 200))
    t0 = time.perf_counter()
    assert _report(tmp_path, tmp_path / "c0", tmp_path / "o0") == 0
    cold = time.perf_counter() - t0
    ref = _metrics(tmp_path / "o0")
    for i, frac in enumerate((0.35, 0.6, 0.85)):
        cache, out = tmp_path / f"c{i + 1}", tmp_path / f"o{i + 1}"
        _report(tmp_path, cache, out, kill_after=cold * frac)
        assert _report(tmp_path, cache, out) == 0
        assert _metrics(out) == ref
        assert not list(cache.rglob(".tmp-*")) and not list(out.rglob(".tmp-*"))


def test_atomic_dir_keeps_an_equal_artifact_a_concurrent_writer_finished(tmp_path):
    """Two Ray workers building the same content-addressed variant into a shared cache: the second
    keeps the first one's folder (``keep_existing``) and leaves no temporary behind; without it the
    newer build replaces the older."""
    from deepship.utils import atomic_dir

    dest = tmp_path / "v"
    with atomic_dir(dest) as d:
        (d / "a").write_text("first")
    with atomic_dir(dest, keep_existing=lambda p: (p / "a").is_file()) as d:
        (d / "a").write_text("second")
    assert (dest / "a").read_text() == "first"
    with atomic_dir(dest) as d:
        (d / "a").write_text("third")
    assert (dest / "a").read_text() == "third"
    assert [p.name for p in tmp_path.iterdir()] == ["v"]


def test_sweep_removes_dead_local_temps_and_keeps_other_hosts_young_ones(tmp_path):
    """Temporaries are named ``.tmp-<name>-<pid>@<host>-<rand>``: a dead pid of this host is swept at
    once, a live one never, another host's only after REMOTE_TEMP_AGE_S (its pid means nothing here)."""
    from deepship.utils import REMOTE_TEMP_AGE_S, _host, sweep_stale_temp

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine_dead = tmp_path / f".tmp-v-{dead.pid}@{_host()}-abc"
    mine_live = tmp_path / f".tmp-v-{os.getpid()}@{_host()}-abd"
    other_young = tmp_path / f".tmp-v-{dead.pid}@some.other.node-abe"
    other_old = tmp_path / f".tmp-v-{dead.pid}@some.other.node-abf"
    for p in (mine_dead, mine_live, other_young, other_old):
        p.mkdir()
    old = time.time() - REMOTE_TEMP_AGE_S - 10
    os.utime(other_old, (old, old))
    removed = sweep_stale_temp(tmp_path)
    assert sorted(removed) == sorted([mine_dead, other_old])
    assert mine_live.is_dir() and other_young.is_dir()
