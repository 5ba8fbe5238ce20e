"""Load test of ``optimize serve``: startup-to-ready, dynamic batching on vs off, overload.

What it does (traffic to 127.0.0.1 only; every run bounded in duration and request count):

1. Startup to ready: starts ``optimize serve REPORT.json`` (every servable variant of the default
   zoo) as a subprocess and polls ``/v2/health/ready`` until it answers 200; repeated, median kept.
2. Throughput and latency of the digits CNN (``cnn-fp32-onnx``) with dynamic batching on and off
   at 1, 16 and 64 concurrent clients, driven by ``wrk`` (a C HTTP load generator; Debian
   package ``wrk``) with a Lua script that sends distinct held-out digits, each tagged with the
   protocol's request ``id``, and checks every response against the direct ONNX Runtime session
   output for that digit (|got - want| <= 1e-4 (1 + |want|)).
3. Overload: batching on with a small queue (``--overload-queue``) at twice its capacity in
   concurrent clients (capacity = queue + max batch): answers must be 200 or 503 with
   ``Retry-After`` only, and the server's resident memory (VmRSS, sampled) must stay bounded.

Writes ``benchmarks/results/loadtest.json`` and prints a table. Needs ``wrk`` on the PATH
(``apt-get install -y wrk``). Run from the repository root::

    DEEPSHIP_CACHE=/tmp/cache .venv/bin/python benchmarks/loadtest.py            # ~2 min
    .venv/bin/python benchmarks/loadtest.py --report report/report.json --duration 5
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LUA = r"""
-- deepship load-test script: distinct requests tagged with an id, every response checked.
local cases = dofile(os.getenv("DS_CASES"))
local max_requests = tonumber(os.getenv("DS_MAX") or "0")
local threads = {}
local reqs = {}
local n_sent = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  ok, mismatched, bad_body, s200, s503, s4xx, s5xx, sother, no_retry_after, answered = 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
  for i, b in ipairs(cases.bodies) do
    reqs[i] = wrk.format("POST", cases.path, {["Content-Type"] = "application/json"}, b)
  end
end

function request()
  n_sent = n_sent + 1
  return reqs[(n_sent - 1) % #reqs + 1]
end

local function check(body)
  local id = tonumber(body:match('"id":"(%d+)"'))
  local data = body:match('"data":%[([^%]]*)%]')
  if id == nil or data == nil or cases.expected[id] == nil then
    bad_body = bad_body + 1
    return
  end
  local want = cases.expected[id]
  local j, good = 0, true
  for v in data:gmatch("[^,]+") do
    j = j + 1
    local w = want[j]
    if w == nil or math.abs(tonumber(v) - w) > cases.tol * (1 + math.abs(w)) then good = false end
  end
  if j ~= #want then good = false end
  if good then ok = ok + 1 else mismatched = mismatched + 1 end
end

function response(status, headers, body)
  answered = answered + 1
  if status == 200 then
    s200 = s200 + 1
    check(body)
  elseif status == 503 then
    s503 = s503 + 1
    if headers["retry-after"] == nil and headers["Retry-After"] == nil then no_retry_after = no_retry_after + 1 end
  elseif status >= 500 then s5xx = s5xx + 1
  elseif status >= 400 then s4xx = s4xx + 1
  else sother = sother + 1 end
  if max_requests > 0 and answered >= max_requests then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local keys = {"ok", "mismatched", "bad_body", "s200", "s503", "s4xx", "s5xx", "sother", "no_retry_after"}
  local tot = {}
  for _, k in ipairs(keys) do tot[k] = 0 end
  for _, t in ipairs(threads) do
    for _, k in ipairs(keys) do tot[k] = tot[k] + (t:get(k) or 0) end
  end
  local f = io.open(os.getenv("DS_OUT"), "w")
  f:write(string.format('{"requests": %d, "duration_us": %d, "bytes": %d, ', summary.requests, summary.duration,
                        summary.bytes))
  f:write(string.format('"err_connect": %d, "err_read": %d, "err_write": %d, "err_timeout": %d, "err_status": %d, ',
                        summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout,
                        summary.errors.status))
  f:write(string.format('"p50_us": %.1f, "p90_us": %.1f, "p99_us": %.1f, "max_us": %.1f, "mean_us": %.1f',
                        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
                        latency.mean))
  for _, k in ipairs(keys) do f:write(string.format(', "%s": %d', k, tot[k])) end
  f:write("}\n")
  f:close()
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def import_s(module: str) -> float:
    """Seconds for a fresh interpreter to start and import ``module``."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=str(ROOT), capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (all its threads)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (VmRSS)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def get_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


class Server:
    """``optimize serve`` as a subprocess on 127.0.0.1; ``ready_s`` = spawn to first 200 on /ready."""

    def __init__(self, args: list[str], timeout_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "deepship.cli", "serve", *args, "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=str(ROOT), stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        while get_status(self.url + "/v2/health/ready", 1.0) != 200:
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                self.stop()
                self.log.seek(0)
                raise SystemExit(f"server failed to start: {self.log.read().decode()[-2000:]}")
            time.sleep(0.01)
        self.ready_s = time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.samples, self._stop_evt = pid, every_s, [], threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            self.samples.append(rss_mib(self.pid))
            time.sleep(self.every_s)

    def stop(self) -> list[float]:
        self._stop_evt.set()
        self.join()
        return self.samples


def write_cases(path: Path, model: str, inputs: np.ndarray, expected: np.ndarray, tol: float) -> None:
    """The Lua data file: one JSON request body per digit (id = index) and the expected logits."""
    lines = ["return {", f'  path = "/v2/models/{model}/infer",', f"  tol = {tol!r},", "  bodies = {"]
    for i, x in enumerate(inputs):
        body = json.dumps({"id": str(i), "inputs": [{"name": "x", "shape": [1, *x.shape], "datatype": "FP32",
                                                     "data": [float(v) for v in x.ravel()]}]}, separators=(",", ":"))
        lines.append(f"    {json.dumps(body)},")
    lines.append("  },")
    lines.append("  expected = {")
    for i, e in enumerate(expected):
        lines.append(f"    [{i}] = {{{', '.join(repr(float(v)) for v in e)}}},")
    lines += ["  },", "}"]
    path.write_text("\n".join(lines) + "\n")


def run_wrk(url: str, clients: int, duration_s: float, max_requests: int, cases: Path, script: Path,
            threads: int = 1) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    env = {**os.environ, "DS_CASES": str(cases), "DS_OUT": str(out), "DS_MAX": str(max_requests)}
    cmd = ["wrk", "-t", str(min(threads, clients)), "-c", str(clients), "-d", f"{duration_s:g}s", "--timeout", "10s",
           "-s", str(script), url]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=duration_s + 60)
    res = json.loads(out.read_text())
    out.unlink()
    return res


def summarize(res: dict) -> dict:
    dur = res["duration_us"] / 1e6
    return {
        "requests": res["requests"], "duration_s": round(dur, 2),
        "throughput_rps": round(res["s200"] / dur, 1),
        "offered_rps": round(res["requests"] / dur, 1),
        "p50_ms": round(res["p50_us"] / 1e3, 3), "p90_ms": round(res["p90_us"] / 1e3, 3),
        "p99_ms": round(res["p99_us"] / 1e3, 3), "max_ms": round(res["max_us"] / 1e3, 3),
        "status": {"200": res["s200"], "503": res["s503"], "other_4xx": res["s4xx"], "other_5xx": res["s5xx"],
                   "other": res["sother"]},
        "checked_ok": res["ok"], "mismatched": res["mismatched"], "unparsable": res["bad_body"],
        "socket_errors": {"connect": res["err_connect"], "read": res["err_read"], "write": res["err_write"],
                          "timeout": res["err_timeout"]},
        "503_without_retry_after": res["no_retry_after"],
    }


def ensure_report(path: str | None) -> Path:
    """The given report, or the default zoo's report built into the cache (batch 1, short timings)."""
    if path:
        return Path(path)
    from deepship.models import resolve
    from deepship.models.zoo import DEFAULT_SET
    from deepship.pipeline.report import run_report
    from deepship.utils import cache_root

    out = cache_root() / "loadtest-report"
    if not (out / "report.json").is_file():
        print(f"building the default zoo's variants into {out} (once) ...", flush=True)
        run_report([resolve(n) for n in DEFAULT_SET], out_dir=out, batches=(1,), min_time_s=0.05)
    return out / "report.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", help="report.json to serve (default: build the default zoo's)")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per measured run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (clients x batching on/off); medians reported")
    ap.add_argument("--max-requests", type=int, default=200_000, help="most requests per run")
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--startup-repeats", type=int, default=3)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-queue-delay-ms", type=float, default=0.0)
    ap.add_argument("--overload-queue", type=int, default=32, help="max queue size for the overload run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loadtest.json"))
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")

    from deepship.runtimes.session import OrtSession
    from deepship.utils import machine_info, write_json_atomic

    load_before = os.getloadavg()
    report = ensure_report(a.report)
    rep = json.loads(report.read_text())
    cnn_row = next(v for m in rep["models"] if m["model"] == "cnn" for v in m["variants"] if v["variant"] == "fp32-onnx")
    n_models = sum(1 for m in rep["models"] for v in m["variants"]
                   if v.get("status") == "ok" and str(v.get("format", "")).startswith(("onnx", "engine:")))

    # 1. startup to ready, every servable variant of the report
    startup, load_s = [], []
    for _ in range(a.startup_repeats):
        s = Server([str(report)])
        startup.append(round(s.ready_s, 3))
        s.stop()
        s.log.seek(0)
        m = re.search(r"loaded (\d+) models in ([\d.]+) s", s.log.read().decode())
        load_s.append(float(m.group(2)) if m else None)
    imports = {what: round(statistics.median(import_s(what) for _ in range(a.startup_repeats)), 3)
               for what in ("torch", "deepship.serving", "deepship.cli")}
    print(f"startup to ready ({n_models} models): {startup} s; loading the models took {load_s} s; "
          f"imports alone: {imports} s", flush=True)

    # expected outputs: the direct session, one digit at a time
    from deepship.models.vision.data import digits

    xs = digits(True).test.inputs["x"][:256].astype(np.float32)
    sess = OrtSession(cnn_row["artifact"], threads=1)
    want = np.concatenate([sess.run({"x": x[None]})["logits"] for x in xs])
    work = Path(tempfile.mkdtemp(prefix="loadtest-"))
    cases, script = work / "cases.lua", work / "check.lua"
    write_cases(cases, "cnn-fp32-onnx", xs, want, 1e-4)
    script.write_text(LUA)

    common = [str(report), "--model", "cnn", "--variant", "fp32-onnx", "--max-batch-size", str(a.max_batch_size),
              "--max-queue-delay-ms", str(a.max_queue_delay_ms)]
    runs = []
    clients = [int(c) for c in a.clients.split(",")]
    servers = {b: Server(common + ["--batching" if b else "--no-batching", "--max-queue-size", "256"])
               for b in (True, False)}
    try:
        for s in servers.values():
            run_wrk(s.url, 16, 1.0, a.max_requests, cases, script)  # warm-up
        # rounds interleave batching on and off, so a burst of load from the machine's other users
        # does not fall on one configuration only; the medians over rounds are reported
        for rnd in range(a.rounds):
            for c in clients:
                for batching, s in servers.items():
                    sampler = RssSampler(s.proc.pid)
                    sampler.start()
                    cpu0 = cpu_s(s.proc.pid)
                    res = summarize(run_wrk(s.url, c, a.duration, a.max_requests, cases, script))
                    cpu = cpu_s(s.proc.pid) - cpu0
                    rss = sampler.stop()
                    res.update({"round": rnd, "batching": batching, "clients": c,
                                "server_cpu_us_per_request": round(cpu / max(res["status"]["200"], 1) * 1e6, 1),
                                "server_rss_mib_max": round(max(rss), 1)})
                    runs.append(res)
                    print(f"round {rnd} batching {'on ' if batching else 'off'} clients {c:3d}: "
                          f"{res['throughput_rps']:8.1f} req/s p50 {res['p50_ms']:.2f} ms p99 {res['p99_ms']:.2f} ms "
                          f"server CPU {res['server_cpu_us_per_request']:.0f} us/req status {res['status']} "
                          f"mismatched {res['mismatched']}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    table = []
    for c in clients:
        for batching in (True, False):
            rs = [r for r in runs if r["clients"] == c and r["batching"] == batching]
            table.append({"batching": batching, "clients": c, "rounds": len(rs),
                          **{k: round(statistics.median(r[k] for r in rs), 3) for k in
                             ("throughput_rps", "p50_ms", "p90_ms", "p99_ms", "server_cpu_us_per_request")},
                          "throughput_rps_all": [r["throughput_rps"] for r in rs],
                          "requests": sum(r["requests"] for r in rs),
                          "checked_ok": sum(r["checked_ok"] for r in rs),
                          "non_200": sum(r["requests"] - r["status"]["200"] for r in rs),
                          "mismatched": sum(r["mismatched"] + r["unparsable"] for r in rs)})

    # 3. overload: twice the admission capacity (queue + one batch) in concurrent clients
    capacity = a.overload_queue + a.max_batch_size
    s = Server(common + ["--batching", "--max-queue-size", str(a.overload_queue)])
    try:
        run_wrk(s.url, 16, 1.0, a.max_requests, cases, script)
        rss_before = rss_mib(s.proc.pid)
        sampler = RssSampler(s.proc.pid)
        sampler.start()
        res = summarize(run_wrk(s.url, 2 * capacity, a.duration, a.max_requests, cases, script, threads=2))
        rss = sampler.stop()
        alive = get_status(s.url + "/v2/health/live") == 200
        rss_after = rss_mib(s.proc.pid)
    finally:
        s.stop()
    overload = {**res, "clients": 2 * capacity, "max_queue_size": a.overload_queue, "capacity_requests": capacity,
                "server_rss_mib_before": round(rss_before, 1), "server_rss_mib_max": round(max(rss), 1),
                "server_rss_mib_after": round(rss_after, 1), "alive_after": alive}
    print(f"overload ({2 * capacity} clients, queue {a.overload_queue}): status {res['status']}, "
          f"RSS {rss_before:.0f} -> max {max(rss):.0f} MiB, alive {alive}", flush=True)

    def thr(batching: bool, c: int) -> float:
        return next(r["throughput_rps"] for r in table if r["batching"] == batching and r["clients"] == c)

    top = max(clients)
    ratio = thr(True, top) / max(thr(False, top), 1e-9)
    below = runs

    def at_top(batching: bool, key: str) -> list[float]:
        return [r[key] for r in sorted(runs, key=lambda r: r["round"]) if r["clients"] == top and r["batching"] == batching]

    per_round = [round(on / max(off, 1e-9), 2) for on, off in zip(at_top(True, "throughput_rps"),
                                                                   at_top(False, "throughput_rps"))]
    cpu_on = statistics.median(at_top(True, "server_cpu_us_per_request"))
    cpu_off = statistics.median(at_top(False, "server_cpu_us_per_request"))
    bars = {
        f"batching_speedup_at_{top}_clients": round(ratio, 2),
        "batching_speedup_target": 3.0,
        "batching_speedup_met": ratio >= 3.0,
        f"batching_speedup_per_round_at_{top}_clients": per_round,
        f"server_cpu_per_request_ratio_at_{top}_clients": round(cpu_off / max(cpu_on, 1e-9), 2),
        "errors_below_capacity": sum(r["requests"] - r["status"]["200"] + r["mismatched"] + r["unparsable"]
                                     + sum(r["socket_errors"].values()) for r in below),
        "overload_only_200_and_503": overload["status"]["other_4xx"] + overload["status"]["other_5xx"]
        + overload["status"]["other"] == 0 and overload["503_without_retry_after"] == 0,
        "overload_memory_growth_mib": round(overload["server_rss_mib_max"] - overload["server_rss_mib_before"], 1),
        "startup_to_ready_median_s": statistics.median(startup),
        "startup_target_s": 5.0,
        "startup_met": statistics.median(startup) < 5.0,
    }
    result = {
        "benchmark": "loadtest", "machine": machine_info(), "shared_machine": True,
        "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "generator": "wrk 4.1 (Debian), 1 thread (2 for overload), Lua script checking every response",
        "settings": {"duration_s": a.duration, "max_requests": a.max_requests, "model": "cnn-fp32-onnx",
                     "max_batch_size": a.max_batch_size, "max_queue_delay_ms": a.max_queue_delay_ms,
                     "threads_per_model": os.environ.get("DEEPSHIP_THREADS", "cores - 1"),
                     "request": "1 digit (1x1x8x8 FP32) per request, JSON; 256 distinct held-out digits",
                     "tolerance": "1e-4 * (1 + |want|)"},
        "startup": {"models": n_models, "ready_s": startup, "median_s": statistics.median(startup),
                    "model_loading_s": load_s, "import_only_s": imports,
                    "note": "spawn of `python -m deepship.cli serve REPORT` to the first 200 on /v2/health/ready"},
        "summary": table, "runs": runs, "overload": overload, "bars": bars,
    }
    write_json_atomic(a.out, result)
    shutil.rmtree(work, ignore_errors=True)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"cnn-fp32-onnx over HTTP, wrk on 127.0.0.1, median of {a.rounds} rounds "
                    f"({result['machine']['cpu']}, shared)")
    for col in ("batching", "clients", "req/s", "p50 ms", "p90 ms", "p99 ms", "server CPU us/req", "checked", "non-200"):
        t.add_column(col, justify="right")
    for r in table:
        t.add_row("on" if r["batching"] else "off", str(r["clients"]), f"{r['throughput_rps']:.0f}", f"{r['p50_ms']:.2f}",
                  f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['server_cpu_us_per_request']:.0f}",
                  str(r["checked_ok"]), str(r["non_200"]))
    Console().print(t)
    print(json.dumps(bars, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
