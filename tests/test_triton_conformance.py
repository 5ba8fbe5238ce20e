"""The server against tritonclient[http], call by call (issue 20): every method the client offers
either works or fails with an InferenceServerException carrying the server's own message; the
statistics and classification extensions; Triton's metric names with exact counts after a known
number of requests."""
from __future__ import annotations

import json
import re
import urllib.request

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from deepship import api
from deepship.serving import BatcherConfig, InferenceServer, ServerConfig, load_repository, start_in_thread

MODEL = "cnn-fp32-onnx"


@pytest.fixture(scope="module")
def running(zoo_ctx, tmp_path_factory):
    ctx = zoo_ctx("cnn")
    v = api.export(ctx)
    rep = {"schema_version": 1, "models": [{"model": "cnn", "inputs": ["x:float32[batch,1,8,8]"], "variants": [
        {"variant": "fp32-onnx", "format": "onnx", "status": "ok", "precision": "fp32", "artifact": str(v.path)}]}]}
    p = tmp_path_factory.mktemp("tc") / "report.json"
    p.write_text(json.dumps(rep))
    srv = InferenceServer(load_repository([str(p)], max_batch_size=16), ServerConfig())
    with start_in_thread(srv) as r:
        yield r


@pytest.fixture(scope="module")
def x():
    from deepship.models.vision.data import digits

    return digits(True).test.inputs["x"][:8].astype(np.float32)


def _client(running):
    return th.InferenceServerClient(running.url.removeprefix("http://"))


def _server_said(exc: InferenceServerException, *words: str) -> None:
    msg = exc.message()
    assert msg and all(w in msg for w in words), msg


def test_every_client_call(running, x):
    c = _client(running)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
    assert not c.is_model_ready("nope")
    meta = c.get_server_metadata()
    assert {"statistics", "classification", "binary_tensor_data"} <= set(meta["extensions"])
    assert c.get_model_metadata(MODEL)["name"] == MODEL and c.get_model_config(MODEL)["max_batch_size"] == 16
    assert [m["name"] for m in c.get_model_repository_index()] == [MODEL]
    inp = th.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    assert c.infer(MODEL, [inp]).as_numpy("logits").shape == (8, 10)
    assert c.async_infer(MODEL, [inp]).get_result().as_numpy("logits").shape == (8, 10)
    stats = c.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["name"] == MODEL and stats["inference_count"] >= 16 and stats["execution_count"] >= 2
    assert stats["inference_stats"]["success"]["count"] >= 2 and stats["inference_stats"]["success"]["ns"] > 0
    assert c.get_inference_statistics()["model_stats"][0]["name"] == MODEL
    for call, words in [
            (lambda: c.load_model(MODEL), ["model load is not supported"]),
            (lambda: c.unload_model(MODEL), ["model unload is not supported"]),
            (lambda: c.get_trace_settings(), ["trace settings"]),
            (lambda: c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}), ["trace settings"]),
            (lambda: c.get_log_settings(), ["log settings"]),
            (lambda: c.update_log_settings({"log_info": True}), ["log settings"]),
            (lambda: c.get_system_shared_memory_status(), ["shared memory"]),
            (lambda: c.register_system_shared_memory("r", "/k", 64), ["shared memory"]),
            (lambda: c.unregister_system_shared_memory(), ["shared memory"]),
            (lambda: c.get_cuda_shared_memory_status(), ["CUDA shared memory"]),
            (lambda: c.unregister_cuda_shared_memory(), ["CUDA shared memory"]),
            (lambda: c.get_model_metadata("nope"), ["unknown model 'nope'"]),
            (lambda: c.get_model_config(MODEL, model_version="7"), ["no version '7'"]),
            (lambda: c.get_inference_statistics("nope"), ["unknown model"]),
            (lambda: c.infer("nope", [inp]), ["unknown model"]),
            (lambda: c.infer("..%2Fetc", [inp]), ["invalid model name"])]:
        with pytest.raises(InferenceServerException) as e:
            call()
        _server_said(e.value, *words)
    # an extension the server does not have: the protocol's error body, which the client decodes
    from tritonclient.http._utils import _raise_if_error

    resp = c._get("v2/models/" + MODEL + "/unknown_extension", headers=None, query_params=None)
    with pytest.raises(InferenceServerException) as e:
        _raise_if_error(resp)
    _server_said(e.value, "no endpoint GET")


def test_unknown_routes_answer_the_protocol_error(running):
    for method, path in [("GET", "/v2/models/" + MODEL + "/unknown_extension"), ("GET", "/v2/nope"),
                         ("GET", "/v2/models/" + MODEL + "/infer"), ("DELETE", "/v2/models/" + MODEL)]:
        req = urllib.request.Request(running.url + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        body = json.loads(e.value.read())
        assert e.value.code in (400, 404, 405) and isinstance(body.get("error"), str) and "detail" not in body, body


def test_classification_extension(running, x):
    c = _client(running)
    inp = th.InferInput("x", list(x[:3].shape), "FP32")
    inp.set_data_from_numpy(x[:3])
    full = c.infer(MODEL, [inp]).as_numpy("logits")
    for binary in (True, False):
        res = c.infer(MODEL, [inp], outputs=[th.InferRequestedOutput("logits", binary_data=binary, class_count=3)])
        top = res.as_numpy("logits")
        assert top.shape == (3, 3)
        for row, ref in zip(top, full):
            vals = [e.decode() if isinstance(e, bytes) else e for e in row]
            idx = [int(v.split(":")[1]) for v in vals]
            assert idx == list(np.argsort(-ref)[:3])
            assert float(vals[0].split(":")[0]) == pytest.approx(float(ref.max()), rel=1e-5)


def test_triton_metric_names_count_exactly(zoo_ctx, tmp_path, x):
    ctx = zoo_ctx("cnn")
    v = api.export(ctx)
    rep = {"schema_version": 1, "models": [{"model": "cnn", "inputs": ["x:float32[batch,1,8,8]"], "variants": [
        {"variant": "fp32-onnx", "format": "onnx", "status": "ok", "precision": "fp32", "artifact": str(v.path)}]}]}
    (tmp_path / "report.json").write_text(json.dumps(rep))
    srv = InferenceServer(load_repository([str(tmp_path / "report.json")], max_batch_size=16),
                          ServerConfig(batching=BatcherConfig(False)))  # one execution per request
    with start_in_thread(srv) as r:
        c = _client(r)
        for b in (1, 2, 5):
            inp = th.InferInput("x", [b, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(x[:b])
            c.infer(MODEL, [inp])
        with pytest.raises(InferenceServerException):
            c.infer(MODEL, [inp], model_version="3")  # an unknown version: a failure of this model
        bad = th.InferInput("x", [1, 1, 9, 9], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1, 9, 9), np.float32))
        with pytest.raises(InferenceServerException):
            c.infer(MODEL, [bad])
        text = urllib.request.urlopen(r.url + "/metrics", timeout=10).read().decode()

    def value(name):
        m = re.search(rf'^{name}{{model="{MODEL}",version="1"}} (\d+)', text, re.M)
        assert m, (name, text[-2000:])
        return int(m.group(1))

    assert value("nv_inference_request_success") == 3
    assert value("nv_inference_request_failure") == 2
    assert value("nv_inference_count") == 8  # 1 + 2 + 5 samples
    assert value("nv_inference_exec_count") == 3
    assert value("nv_inference_request_duration_us") > 0 and value("nv_inference_compute_infer_duration_us") > 0
    assert value("nv_inference_queue_duration_us") >= 0
    assert "# TYPE nv_inference_count counter" in text
