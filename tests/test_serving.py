"""The serving process: Open Inference Protocol endpoints driven by tritonclient, input validation,
dynamic batching, overload answered with 503 + Retry-After, metrics, safety and start-up failures.

Servers run in-process on 127.0.0.1 with a free port (one test starts ``optimize serve`` as a
subprocess). Nothing here is timed; the load test (benchmarks/loadtest.py) measures.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from deepship import api
from deepship.errors import ArtifactError
from deepship.serving import (
    BatcherConfig,
    DynamicBatcher,
    InferenceServer,
    ModelRepository,
    RequestError,
    ServedModel,
    ServerConfig,
    ServingError,
    load_repository,
    start_in_thread,
)
from deepship.serving.protocol import HEADER_LENGTH
from deepship.serving.repository import valid_name

ROOT = Path(__file__).resolve().parents[1]


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnn_report(zoo_ctx, tmp_path_factory):
    """A report.json with the digits CNN's FP32 ONNX and ONNX Runtime engine variants (plus a torch row and
    a failed row, which the server skips)."""
    ctx = zoo_ctx("cnn")
    onnx_v = api.export(ctx)
    eng = api.engine(ctx, "onnxruntime")
    rows = [
        {"variant": "fp32-torch", "format": "torch", "status": "ok", "artifact": "x/weights.safetensors"},
        {"variant": "fp32-onnx", "format": "onnx", "status": "ok", "precision": "fp32", "artifact": str(onnx_v.path)},
        {"variant": "ort-engine", "format": "engine:onnxruntime", "status": "ok", "precision": "fp32",
         "artifact": str(eng.path)},
        {"variant": "int8-static", "format": "onnx", "status": "failed", "error": "boom"},
    ]
    rep = {"schema_version": 1, "models": [{"model": "cnn", "inputs": ["x:float32[batch,1,8,8]"], "variants": rows}]}
    p = tmp_path_factory.mktemp("report") / "report.json"
    p.write_text(json.dumps(rep))
    return p, onnx_v, eng


@pytest.fixture(scope="module")
def digits():
    from deepship.models.vision.data import digits

    return digits(True).test.inputs["x"][:64].astype(np.float32)


@pytest.fixture(scope="module")
def server(cnn_report):
    repo = load_repository([str(cnn_report[0])], max_batch_size=16)
    srv = InferenceServer(repo, ServerConfig(max_body_bytes=64 * 1024))
    with start_in_thread(srv) as running:
        yield running


def http(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, headers, body) of one request; never raises for an HTTP error status."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method or ("POST" if body else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def infer_body(x: np.ndarray, name: str = "x", datatype: str = "FP32", **extra) -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                                   "data": x.ravel().tolist()}], **extra}).encode()


def expected(repo_model, x):
    return repo_model.session.run({"x": x})["logits"]


# ---- protocol, with an existing client --------------------------------------------------------

def test_tritonclient_round_trip(server, digits):
    import tritonclient.http as th

    client = th.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert set(server.server.repository.names()) == {"cnn-fp32-onnx", "cnn-ort-engine"}
    meta = client.get_model_metadata("cnn-fp32-onnx")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    cfg = client.get_model_config("cnn-fp32-onnx")
    assert cfg["max_batch_size"] == 16 and cfg["input"][0]["dims"] == [1, 8, 8]
    for name in ("cnn-fp32-onnx", "cnn-ort-engine"):
        assert client.is_model_ready(name)
        x = digits[:5]
        ref = expected(server.server.repository.get(name), x)
        inp = th.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # binary tensor data extension (tritonclient's default)
        res = client.infer(name, [inp], request_id="42")
        assert res.get_response()["id"] == "42"
        np.testing.assert_allclose(res.as_numpy("logits"), ref, rtol=1e-5, atol=1e-5)
        inp.set_data_from_numpy(x, binary_data=False)  # JSON in, JSON out
        res = client.infer(name, [inp], outputs=[th.InferRequestedOutput("logits", binary_data=False)])
        np.testing.assert_allclose(res.as_numpy("logits"), ref, rtol=1e-5, atol=1e-5)
    assert not client.is_model_ready("no-such-model")


def test_plain_json_nested_data_and_versions(server, digits):
    x = digits[:2]
    body = json.dumps({"id": "a1", "inputs": [{"name": "x", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                               "data": x.tolist()}]}).encode()
    for path in ("/v2/models/cnn-fp32-onnx/infer", "/v2/models/cnn-fp32-onnx/versions/1/infer"):
        st, hdr, out = http(server.url + path, body, {"Content-Type": "application/json"})
        assert st == 200, out
        res = json.loads(out)
        assert res["model_name"] == "cnn-fp32-onnx" and res["id"] == "a1"
        got = np.array(res["outputs"][0]["data"], np.float32).reshape(res["outputs"][0]["shape"])
        np.testing.assert_allclose(got, expected(server.server.repository.get("cnn-fp32-onnx"), x), atol=1e-5)
    st, _, out = http(server.url + "/v2/models/cnn-fp32-onnx/versions/2/infer", body)
    assert st == 404 and b"version" in out
    st, _, out = http(server.url + "/v2")
    assert "binary_tensor_data" in json.loads(out)["extensions"]


def test_binary_request_by_hand(server, digits):
    x = digits[:3]
    head = json.dumps({"inputs": [{"name": "x", "shape": [3, 1, 8, 8], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    st, hdr, out = http(server.url + "/v2/models/cnn-fp32-onnx/infer", head + x.tobytes(),
                        {HEADER_LENGTH: str(len(head))})
    assert st == 200, out
    hl = int(hdr[HEADER_LENGTH])
    meta = json.loads(out[:hl])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 3 * 10 * 4
    got = np.frombuffer(out[hl:], np.float32).reshape(3, 10)
    np.testing.assert_allclose(got, expected(server.server.repository.get("cnn-fp32-onnx"), x), atol=1e-5)
    # a size that does not match the tensor
    st, _, out = http(server.url + "/v2/models/cnn-fp32-onnx/infer", head + x.tobytes()[:-4],
                      {HEADER_LENGTH: str(len(head))})
    assert st == 400 and b"binary_data_size" in out


# ---- validation and safety ----------------------------------------------------------------------

@pytest.mark.parametrize("case, needle", [
    ("wrong_name", "has no input 'image'"),
    ("wrong_dtype", "datatype FP64"),
    ("wrong_shape", "expects [-1, 1, 8, 8]"),
    ("wrong_rank", "expects [-1, 1, 8, 8]"),
    ("wrong_count", "elements"),
    ("too_big_batch", "max_batch_size 16"),
    ("bad_json", "not valid JSON"),
    ("no_inputs", "'inputs'"),
    ("unknown_output", "has no output 'probs'"),
    ("bad_data", "not a (nested) list"),
])
def test_bad_inputs_are_400_with_a_clear_message(server, digits, case, needle):
    x = digits[:1]
    body = {
        "wrong_name": infer_body(x, name="image"),
        "wrong_dtype": infer_body(x.astype(np.float64), datatype="FP64"),
        "wrong_shape": infer_body(np.zeros((1, 1, 8, 9), np.float32)),
        "wrong_rank": infer_body(np.zeros((1, 64), np.float32)),
        "wrong_count": json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                               "data": [0.0] * 63}]}).encode(),
        "too_big_batch": infer_body(np.zeros((17, 1, 8, 8), np.float32)),
        "bad_json": b"{not json",
        "no_inputs": b"{}",
        "unknown_output": infer_body(x, outputs=[{"name": "probs"}]),
        "bad_data": json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                            "data": ["a"] * 64}]}).encode(),
    }[case]
    st, _, out = http(server.url + "/v2/models/cnn-fp32-onnx/infer", body)
    assert st == 400, out
    msg = json.loads(out)["error"]
    assert needle in msg and "\n" not in msg


def test_model_names_unknown_invalid_and_traversal(server, digits):
    body = infer_body(digits[:1])
    st, _, out = http(server.url + "/v2/models/cnn/infer", body)
    assert st == 404 and b"served models: cnn-fp32-onnx" in out
    for bad in ("..", "a..b", ".hidden", "%2e%2e", "..%2F..%2Fetc%2Fpasswd", "..%2Fetc"):
        st, _, out = http(server.url + f"/v2/models/{bad}/infer", body)
        assert st == 400 and b"invalid model name" in out, (bad, st, out)
    st, _, out = http(server.url + "/v2/models/../../etc/passwd")
    assert st in (400, 404) and b'"error"' in out
    assert valid_name("cnn-int8-static") and not valid_name("../x") and not valid_name("a/b") and not valid_name("")


def test_body_limit_413(server):
    big = b"{" + b" " * (70 * 1024) + b"}"
    st, _, out = http(server.url + "/v2/models/cnn-fp32-onnx/infer", big)
    assert st == 413 and b"exceeds the limit" in out
    st, _, out = http(server.url + "/v2/models/cnn-fp32-onnx/infer", b"{}", {"Content-Encoding": "gzip"})
    assert st == 415


def test_metrics_have_the_counters(server, digits):
    http(server.url + "/v2/models/cnn-fp32-onnx/infer", infer_body(digits[:2]))
    http(server.url + "/v2/models/cnn-fp32-onnx/infer", infer_body(digits[:1], name="nope"))
    http(server.url + "/v2/models/missing/infer", infer_body(digits[:1]))
    st, hdr, out = http(server.url + "/metrics")
    assert st == 200 and hdr["content-type"].startswith("text/plain")
    text = out.decode()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("deepship_requests_total", (("model", "cnn-fp32-onnx"), ("status", "200")))] >= 1
    assert samples[("deepship_requests_total", (("model", "cnn-fp32-onnx"), ("status", "400")))] >= 1
    assert samples[("deepship_requests_total", (("model", "unknown"), ("status", "404")))] >= 1
    assert samples[("deepship_batch_size_count", (("model", "cnn-fp32-onnx"),))] >= 1
    # this test sent two requests to cnn-fp32-onnx (other tests on the shared server may add more, in any order)
    assert samples[("deepship_request_duration_seconds_count", (("model", "cnn-fp32-onnx"),))] >= 2
    assert ("deepship_queue_depth", (("model", "cnn-ort-engine"),)) in samples
    assert ("deepship_queue_duration_seconds_count", (("model", "cnn-fp32-onnx"),)) in samples


# ---- overload and timeouts -------------------------------------------------------------------------

class GatedSession:
    """Wraps a session; every run waits until the test opens the gate, so queues fill deterministically."""

    def __init__(self, inner):
        self.inner, self.gate, self.batches = inner, threading.Event(), []

    def run(self, feeds):
        self.batches.append(len(feeds["x"]))
        self.gate.wait(20)
        return self.inner.run(feeds)


@pytest.fixture()
def gated_server(server):
    fast = server.server.repository.get("cnn-fp32-onnx")
    sess = GatedSession(fast.session)
    m = ServedModel("gated", sess, fast.inputs, fast.outputs, max_batch_size=4)
    cfg = ServerConfig(batching=BatcherConfig(max_batch_size=4, max_queue_size=2, timeout_s=20.0, retry_after_s=2))
    with start_in_thread(InferenceServer(ModelRepository([m]), cfg)) as running:
        try:
            yield running, fast, sess
        finally:
            sess.gate.set()


def _wait(cond, timeout_s: float = 20.0) -> None:
    t_end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < t_end, "condition not reached"
        time.sleep(0.01)


def test_overload_answers_503_with_retry_after(gated_server, digits):
    running, fast, sess = gated_server
    url = running.url + "/v2/models/gated/infer"
    batcher = running.server.batchers["gated"]
    with ThreadPoolExecutor(3) as pool:
        admitted = [pool.submit(http, url, infer_body(digits[:1]))]
        _wait(lambda: len(sess.batches) == 1)  # one running, held at the gate
        admitted += [pool.submit(http, url, infer_body(digits[i:i + 1])) for i in (1, 2)]
        _wait(lambda: batcher.depth == 2)  # two queued: the queue is full
        for i in range(3, 8):  # every further request is shed at once
            st, hdr, out = http(url, infer_body(digits[i:i + 1]))
            assert st == 503 and hdr.get("Retry-After") == "2" and b"overloaded" in out
        sess.gate.set()
        results = [f.result() for f in admitted]
    got = sorted(np.array(json.loads(out)["outputs"][0]["data"], np.float32).round(4).tobytes() for st, _, out in results)
    want = sorted(expected(fast, digits[i:i + 1]).round(4).tobytes() for i in range(3))
    assert [st for st, _, _ in results] == [200, 200, 200] and got == want
    assert sess.batches == [1, 2]  # the two queued requests ran as one batch
    assert http(running.url + "/v2/health/live")[0] == 200


def test_request_timeout_is_503(gated_server, digits):
    running, _, _ = gated_server
    st, hdr, out = http(running.url + "/v2/models/gated/infer",
                        infer_body(digits[:1], parameters={"timeout": 50_000}))  # 50 ms, as tritonclient sends it
    assert st == 503 and "Retry-After" in hdr and b"timed out" in out


# ---- the batcher itself ------------------------------------------------------------------------------

def _run_batcher(config: BatcherConfig, requests: list[np.ndarray], can_batch: bool = True):
    """Submit ``requests`` while the first batch is held; return (batches seen, outputs)."""
    seen: list[list[int]] = []
    gate = threading.Event()

    def run(feeds):
        if not seen:
            gate.wait(10)
        seen.append([len(feeds["x"])] + list(feeds["x"].shape[1:]))
        return {"y": feeds["x"].reshape(len(feeds["x"]), -1).sum(1, keepdims=True)}

    async def main():
        b = DynamicBatcher("t", run, config, can_batch=can_batch)
        b.start()
        first = asyncio.ensure_future(b.submit({"x": requests[0]}, len(requests[0])))
        await asyncio.sleep(0.05)  # the first batch is now running and held
        rest = [asyncio.ensure_future(b.submit({"x": r}, len(r))) for r in requests[1:]]
        await asyncio.sleep(0.05)
        gate.set()
        outs = await asyncio.gather(first, *rest)
        await b.stop()
        return outs

    outs = asyncio.run(main())
    return seen, outs


def test_dynamic_batching_merges_and_splits():
    rng = np.random.default_rng(0)
    reqs = [rng.random((n, 2, 3), dtype=np.float32) for n in (1, 1, 2, 3, 1, 4)]
    seen, outs = _run_batcher(BatcherConfig(max_batch_size=8), reqs)
    assert [s[0] for s in seen] == [1, 7, 4]  # queued 1+2+3+1 merged; 4 more would pass 8, so it waits
    for r, o in zip(reqs, outs):
        np.testing.assert_allclose(o["y"], r.reshape(len(r), -1).sum(1, keepdims=True), rtol=1e-6)


def test_batching_off_and_shape_groups():
    rng = np.random.default_rng(1)
    reqs = [rng.random((1, 4), dtype=np.float32) for _ in range(4)]
    seen, _ = _run_batcher(BatcherConfig(dynamic_batching=False), reqs)
    assert [s[0] for s in seen] == [1, 1, 1, 1]
    mixed = [rng.random((1, n), dtype=np.float32) for n in (4, 4, 5, 4, 5)]  # e.g. two sequence lengths
    seen, outs = _run_batcher(BatcherConfig(max_batch_size=8), mixed)
    assert seen == [[1, 4], [2, 4], [2, 5]]  # same-shape requests merged, the others in their own batch
    for r, o in zip(mixed, outs):
        np.testing.assert_allclose(o["y"], r.sum(1, keepdims=True), rtol=1e-6)


def test_full_queue_rejects_at_once():
    async def main():
        b = DynamicBatcher("t", lambda f: time.sleep(0.2) or {"y": f["x"]}, BatcherConfig(max_queue_size=1))
        b.start()
        x = np.zeros((1, 2), np.float32)
        a = asyncio.ensure_future(b.submit({"x": x}, 1))
        await asyncio.sleep(0.02)
        c = asyncio.ensure_future(b.submit({"x": x}, 1))  # queued
        await asyncio.sleep(0.01)
        with pytest.raises(RequestError) as e:
            await b.submit({"x": x}, 1)
        assert e.value.status == 503 and e.value.retry_after_s == 1
        await asyncio.gather(a, c)
        await b.stop()

    asyncio.run(main())


# ---- start-up ----------------------------------------------------------------------------------------

def test_bad_model_file_fails_startup(tmp_path, cli, cnn_report):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ArtifactError, match="broken.onnx"):
        load_repository([str(bad)])
    code, _, err = cli("serve", str(bad), "--port", "0")
    assert code == 2 and "broken.onnx" in err and "Traceback" not in err
    with pytest.raises(ArtifactError, match="not found"):
        load_repository([str(tmp_path / "missing.onnx")])
    # a report row whose artifact was deleted
    rep = json.loads(cnn_report[0].read_text())
    rep["models"][0]["variants"][1]["artifact"] = str(tmp_path / "gone" / "model.onnx")
    p = tmp_path / "report.json"
    p.write_text(json.dumps(rep))
    with pytest.raises(ArtifactError, match="gone"):
        load_repository([str(p)], variants=["fp32-onnx"])
    with pytest.raises(ServingError, match="variant 'int9'"):
        load_repository([str(cnn_report[0])], variants=["int9"])
    with pytest.raises(ServingError, match="invalid model name"):
        load_repository([f"../evil={cnn_report[1].path}"])


def test_report_skips_torch_and_failed_rows(server):
    skipped = " ".join(server.server.repository.skipped)
    assert "cnn-fp32-torch" in skipped and "cnn-int8-static" in skipped


def test_engine_checksum_mismatch_fails_startup(cnn_report, tmp_path):
    import shutil

    _, _, eng = cnn_report
    d = tmp_path / "eng"
    shutil.copytree(eng.dir, d)
    with open(d / "engine.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="checksum"):
        load_repository([str(d)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_subprocess(cnn_report, digits):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "deepship.cli", "serve", str(cnn_report[0]), "--port", str(port),
                             "--variant", "fp32-onnx"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=str(ROOT))
    try:
        url = f"http://127.0.0.1:{port}"
        t_end = time.monotonic() + 60
        while True:
            try:
                if http(url + "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < t_end, "server did not become ready"
            time.sleep(0.1)
        st, _, out = http(url + "/v2/models/cnn-fp32-onnx/infer", infer_body(digits[:1]))
        assert st == 200 and json.loads(out)["outputs"][0]["shape"] == [1, 10]
        assert http(url + "/v2/models/cnn-ort-engine")[0] == 404  # filtered out by --variant
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    text = err.decode()
    assert "loaded 1 models" in text and "127.0.0.1" in text


def test_extension_point_adds_routes(server, monkeypatch):
    """A registered ServingExtension (how the generation and streaming-ASR endpoints plug in) gets its routes."""
    from deepship.serving import extensions as ext_module

    class Echo:
        name = "echo"

        def applies(self, model):
            return model.kind == "tensor"

        def install(self, app, srv):
            @app.get("/v2/models/{name}/echo")
            async def echo(name: str):
                return {"model": srv.model(name).name, "inputs": [t.name for t in srv.model(name).inputs]}

    monkeypatch.setitem(ext_module._EXTENSIONS, "echo", Echo())
    srv = InferenceServer(server.server.repository, ServerConfig())
    with start_in_thread(srv) as running:
        st, _, out = http(running.url + "/v2/models/cnn-fp32-onnx/echo")
        assert st == 200 and json.loads(out) == {"model": "cnn-fp32-onnx", "inputs": ["x"]}
        assert "echo" in json.loads(http(running.url + "/v2")[2])["extensions"]
        st, _, _ = http(running.url + "/v2/models/nope/echo")
        assert st == 404


def test_artifact_paths_and_their_names(cnn_report, tmp_path):
    _, onnx_v, eng = cnn_report
    repo = load_repository([str(onnx_v.path), eng.dir])  # cache files/folders: <model>-<variant>
    assert repo.names() == ["cnn-fp32-onnx", f"cnn-{eng.name}"]
    published = api.publish(eng, tmp_path / "digits-engine")  # optimize engine -o DIR
    plain = tmp_path / "my net.onnx"
    api.publish(onnx_v, plain)
    repo = load_repository([str(tmp_path / "digits-engine"), str(plain), f"alias={plain}"])
    assert repo.names() == ["digits-engine", "my-net", "alias"] and published
    assert repo.get("digits-engine").max_batch_size == 64 and repo.get("alias").source["format"] == "onnx"
    with pytest.raises(ServingError, match="two models are named"):
        load_repository([str(plain), f"my-net={plain}"])


def test_fixed_batch_engine_is_served_unbatched_and_unknown_backends_are_skipped(monkeypatch, tmp_path, cnn_report):
    from deepship.errors import InputSpecError
    from deepship.models.spec import TensorSpec
    from deepship.serving import repository as R

    class FixedBatch:  # like an engine compiled for batch 1 that describes its inputs
        input_specs = [TensorSpec("x", ("batch", 4), "float32")]

        def run(self, feeds):
            if len(feeds["x"]) != 1:
                raise InputSpecError("this engine was built for batch 1")
            return {"y": feeds["x"].sum(1, keepdims=True)}

    monkeypatch.setattr(R, "open_source", lambda src, threads=None: FixedBatch())
    m = R.build_model(R.ModelSource("fixed", tmp_path / "x.bin", "engine:fake"), max_batch_size=8)
    assert m.max_batch_size == 0 and [(t.name, t.dims) for t in m.outputs] == [("y", (1, 1))]
    assert m.platform == "deepship_fake"
    monkeypatch.undo()
    rep = json.loads(cnn_report[0].read_text())
    rep["models"][0]["variants"].append({"variant": "trt", "format": "engine:nosuch", "status": "ok",
                                         "artifact": str(tmp_path / "plan.engine")})
    p = tmp_path / "report.json"
    p.write_text(json.dumps(rep))
    sources, skipped = R.sources_from_report(p)
    assert [s.name for s in sources] == ["cnn-fp32-onnx", "cnn-ort-engine"]
    assert any(s.startswith("cnn-trt: unknown engine backend 'nosuch'") for s in skipped)
