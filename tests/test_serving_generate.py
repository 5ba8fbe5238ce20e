"""Token generation endpoints of the serving process (Triton's generate extension) for the GPT decoder.

The trained ``gpt`` and ``gpt-draft`` (committed weights) are exported once per module and served from
a report.json, as ``optimize serve`` would serve them.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from deepship.models import gpt as G
from deepship.pipeline.arch import gpt as AG
from deepship.runtimes import generate as R
from deepship.serving import InferenceServer, ServerConfig, load_repository, start_in_thread

PROMPT = "ROMEO:\nWhat say you"


class _Answer:
    def __init__(self, status: int, headers, body: bytes):
        self.status_code, self.headers, self.body = status, headers, body
        self.text = body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)


def post(url: str, body: dict) -> _Answer:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return _Answer(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return _Answer(e.code, e.headers, e.read())


def get(url: str) -> _Answer:
    with urllib.request.urlopen(url, timeout=60) as r:
        return _Answer(r.status, r.headers, r.read())


def stream_events(url: str, body: dict) -> tuple[str, list[dict]]:
    """(content type, the server-sent events' JSON payloads), read line by line as they arrive."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        ctype = r.headers["content-type"]
        for line in r:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    return ctype, events


@pytest.fixture(scope="module")
def decoders(zoo_ctx):
    out = {}
    for name in ("gpt", "gpt-draft"):
        ctx = zoo_ctx(name)
        out[name] = (ctx, AG.build_variant(ctx, "fp32-onnx"))
    return out


@pytest.fixture(scope="module")
def server(decoders, tmp_path_factory):
    models = []
    for name, (ctx, v) in decoders.items():
        models.append({"model": name, "inputs": [t.describe() if hasattr(t, "describe") else str(t)
                                                 for t in ctx.spec.inputs],
                       "variants": [{"variant": "fp32-onnx", "format": "onnx", "status": "ok", "precision": "fp32",
                                     "artifact": str(v.path)}]})
    p = tmp_path_factory.mktemp("report") / "report.json"
    p.write_text(json.dumps({"schema_version": 1, "models": models}))
    repo = load_repository([str(p)])
    srv = InferenceServer(repo, ServerConfig(port=0, threads=1))
    with start_in_thread(srv) as running:
        yield running


def _direct(decoders, max_new: int, speculative: bool = False, k: int = 4) -> list[int]:
    ctx, v = decoders["gpt"]
    runner = AG.variant_runner(ctx, v, threads=1, mode="arrays")
    ids = G.encode(PROMPT)
    if speculative:
        dctx, dv = decoders["gpt-draft"]
        return R.speculative_generate(runner, AG.variant_runner(dctx, dv, threads=1), ids, max_new, k=k).row(0).tolist()
    return R.generate(runner, ids, max_new).row(0).tolist()


def test_decoders_are_served_with_the_generate_extension(server):
    meta = get(server.url + "/v2").json()
    assert "generate" in meta["extensions"]
    cfg = get(server.url + "/v2/models/gpt-fp32-onnx/config").json()
    assert cfg["max_batch_size"] == 0  # KV-cache requests are never merged


def test_generate_equals_the_direct_greedy_loop(server, decoders):
    r = post(server.url + "/v2/models/gpt-fp32-onnx/generate",
             {"text_input": PROMPT, "parameters": {"max_tokens": 24}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == _direct(decoders, 24)
    assert body["text_output"] == G.decode(body["tokens"]) and body["finish_reason"] == "length"
    assert body["completion_tokens"] == 24 and body["prompt_tokens"] == len(G.encode(PROMPT))


def test_speculative_generate_keeps_the_greedy_tokens(server, decoders):
    r = post(server.url + "/v2/models/gpt-fp32-onnx/generate",
             {"text_input": PROMPT, "max_tokens": 24, "speculative": True, "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["draft"] == "gpt-draft-fp32-onnx" and 0 <= body["acceptance_rate"] <= 1
    assert body["tokens"] == _direct(decoders, 24)


def test_stream_events_concatenate_to_the_full_answer(server):
    full = post(server.url + "/v2/models/gpt-fp32-onnx/generate",
                {"text_input": PROMPT, "parameters": {"max_tokens": 20}}).json()
    ctype, events = stream_events(server.url + "/v2/models/gpt-fp32-onnx/generate_stream",
                                  {"text_input": PROMPT, "parameters": {"max_tokens": 20}})
    assert ctype.startswith("text/event-stream")
    assert len(events) >= 2 and events[-1]["final"] is True
    assert "".join(e["text_output"] for e in events) == full["text_output"]
    assert [t for e in events[:-1] for t in e["tokens"]] == full["tokens"]


def test_sampling_is_seeded_and_stop_strings_end_generation(server):
    def ask(**p):
        return post(server.url + "/v2/models/gpt-fp32-onnx/generate",
                    {"text_input": PROMPT, "parameters": {"max_tokens": 40, **p}}).json()

    a, b = ask(temperature=0.9, top_p=0.9, seed=3), ask(temperature=0.9, top_p=0.9, seed=3)
    assert a["tokens"] == b["tokens"]
    s = ask(stop=["\n"])
    assert s["finish_reason"] in ("stop", "length")
    if s["finish_reason"] == "stop":
        assert s["text_output"].endswith("\n") and "\n" not in s["text_output"][:-1]


@pytest.mark.parametrize("body, status, needle", [
    ({"text_input": ""}, 400, "text_input"),
    ({"parameters": {"max_tokens": 4}}, 400, "text_input"),
    ({"text_input": "x", "parameters": {"max_tokens": 0}}, 400, "max_tokens 0"),
    ({"text_input": "x", "parameters": {"max_tokens": "many"}}, 400, "wrong type"),
    ({"text_input": "x", "parameters": {"temperature": 1.0, "top_p": 1.5}}, 400, "top-p"),
    ({"text_input": "x", "parameters": {"stop": ["ROMEO and JULIET"]}}, 400, "one token"),
    ({"text_input": "x", "parameters": {"speculative": True, "k": 0}}, 400, "k 0"),
    ({"text_input": "x", "parameters": {"speculative": True, "draft": "nope"}}, 400, "not a served decoder"),
    ({"text_input": "word " * 2000}, 400, "context"),
])
def test_bad_generation_requests_are_400_before_any_event(server, body, status, needle):
    for path in ("generate", "generate_stream"):
        r = post(server.url + f"/v2/models/gpt-fp32-onnx/{path}", body)
        assert r.status_code == status, (path, r.text)
        assert needle in r.json()["error"], r.text


def test_unknown_model_404_and_metrics_count_tokens(server):
    r = post(server.url + "/v2/models/nope/generate", {"text_input": "x"})
    assert r.status_code == 404
    # this test's own tokens: under xdist the module's other tests may run in another process
    assert post(server.url + "/v2/models/gpt-fp32-onnx/generate", {"text_input": PROMPT, "max_tokens": 3}).status_code == 200
    metrics = get(server.url + "/metrics").text
    line = [x for x in metrics.splitlines() if x.startswith('deepship_generated_tokens_total{model="gpt-fp32-onnx"}')]
    assert line and float(line[0].split()[-1]) > 0


def test_decoder_infer_still_answers_one_step(server):
    """The decode-step graph is still a tensor model at /infer (empty cache, one token)."""
    past = [{"name": f"past_key_values.{i}.{kv}", "datatype": "FP32", "shape": [1, 4, 0, 32], "data": []}
            for i in range(G.TARGET.n_layer) for kv in ("key", "value")]
    r = post(server.url + "/v2/models/gpt-fp32-onnx/infer", {"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 1], "data": [5]}, *past],
        "outputs": [{"name": "logits"}]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [1, 1, G.TARGET.vocab_size] and np.isfinite(out["data"]).all()


def test_clients_that_leave_mid_stream_free_their_slot(server):
    """More clients than generation slots drop their streams after the first event; each generation
    stops, its slot comes back, and the server still answers (no leaked slot, no crash)."""
    from deepship.serving.generate import MAX_STREAMS

    body = json.dumps({"text_input": PROMPT, "parameters": {"max_tokens": 300}}).encode()
    for _ in range(MAX_STREAMS + 2):
        req = urllib.request.Request(server.url + "/v2/models/gpt-fp32-onnx/generate_stream", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.readline().startswith(b"data: ")
    r = post(server.url + "/v2/models/gpt-fp32-onnx/generate", {"text_input": PROMPT, "max_tokens": 4})
    assert r.status_code == 200, r.text
    metrics = get(server.url + "/metrics").text
    gone = [x for x in metrics.splitlines()
            if x.startswith('deepship_requests_total{model="gpt-fp32-onnx",status="499"}')]
    assert gone and float(gone[0].split()[-1]) >= 1, "no generation was stopped by its client leaving"
