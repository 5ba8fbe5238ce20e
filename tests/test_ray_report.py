"""``optimize report --ray``: a real Ray head on loopback with two worker CPUs gives the serial report."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is missing (pip install -e '.[test]')")

from deepship.errors import StageError  # noqa: E402
from deepship.models import resolve  # noqa: E402
from deepship.pipeline.distributed import split_chains  # noqa: E402
from deepship.pipeline.report import run_report  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` in its own session (short temp dir: Ray's socket paths are limited),
    stopped with its process group at the end."""
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                             "--temp-dir", tmp, "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}")
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the Ray head did not open its port in 90 s")
    yield f"127.0.0.1:{port}"
    for sig, wait_s in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        os.killpg(proc.pid, sig)  # SIGINT: `ray start --block` stops its raylet and GCS and exits
        try:
            proc.wait(wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    shutil.rmtree(tmp, ignore_errors=True)


def test_chains_split_into_trunk_and_leaves():
    todo = [("fp32-torch", None, None, None, None), ("bf16-torch", "quantize", "bf16", {}, "fp32-torch"),
            ("fp32-onnx", "export", "onnx", {}, "fp32-torch"), ("int8", "quantize", "int8-dynamic", {}, "fp32-onnx"),
            ("fp16", "quantize", "fp16", {}, "fp32-onnx")]
    assert split_chains(todo) == (["fp32-torch", "fp32-onnx"], ["bf16-torch", "int8", "fp16"])


def test_ray_report_equals_serial(ray_head, tmp_path):
    specs = [resolve("mlp").replace(family=""), resolve("lstm").replace(family="")]
    kw = dict(batches=(1, 4), min_time_s=0.02, methods=["int8-dynamic", "int8-static", "fp16"], show_progress=False,
              threads=1)
    serial = run_report(specs, out_dir=tmp_path / "serial", **kw)
    on_ray = run_report(specs, out_dir=tmp_path / "ray", ray_address=ray_head, **kw)
    assert (tmp_path / "ray" / "report.html").is_file()
    for a, b in zip(serial["models"], on_ray["models"]):
        assert [v["variant"] for v in a["variants"]] == [v["variant"] for v in b["variants"]]
        for va, vb in zip(a["variants"], b["variants"]):
            assert vb["status"] == "ok", vb.get("error")
            for k in ("metric", "metric_change", "drift", "size_bytes", "key"):
                assert va.get(k) == vb.get(k), (a["model"], va["variant"], k)
            # timings (and so Pareto membership) are measurements: equal batches, within noise on a shared 2-core box
            assert set(va["latency_ms"]) == set(vb["latency_ms"])
            for b_, la in va["latency_ms"].items():
                ratio = vb["latency_ms"][b_]["p50_ms"] / la["p50_ms"]
                assert 0.2 < ratio < 5, (a["model"], va["variant"], b_, ratio)
        assert a["weights"] == b["weights"]
    d = on_ray["distributed"]
    assert d["engine"] == "ray" and d["address"] == ray_head and d["cpus"] == 2
    for model, tasks in d["tasks"].items():
        assert tasks[0]["kind"] == "trunk" and sum(t["kind"] == "leaf" for t in tasks) >= 3
        assert all(t["pid"] != os.getpid() for t in tasks)  # built and timed in Ray's workers, not here


def test_ray_refuses_retrain_and_unreachable_cluster(tmp_path):
    spec = resolve("mlp").replace(family="")
    with pytest.raises(StageError, match="--retrain with --ray"):
        run_report([spec], out_dir=tmp_path / "a", ray=True, retrain=True, show_progress=False)
    t0 = time.perf_counter()
    with pytest.raises(StageError, match="cannot reach the Ray cluster at 127.0.0.1:"):
        run_report([spec], out_dir=tmp_path / "b", ray_address=f"127.0.0.1:{_free_port()}", show_progress=False)
    assert not (tmp_path / "b").exists()
    assert time.perf_counter() - t0 < 120
