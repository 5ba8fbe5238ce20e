"""Continuous batching of the GPT decoder: the fused-attention graph, its KV-cache pool, the
scheduler, and the generate endpoints over them (issue: serve the decoder like an LLM server)."""
from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest

from deepship.errors import InputSpecError
from deepship.models import gpt as G
from deepship.pipeline.arch import gpt as AG
from deepship.runtimes.generate import generate
from deepship.runtimes.kvcache import KVLayout, make_runner
from deepship.runtimes.kvpool import FusedRunner, FusedSession, KVPool
from deepship.runtimes.sampling import Sampling
from deepship.runtimes.session import OrtSession
from deepship.serving import InferenceServer, ServerConfig, load_repository, start_in_thread
from deepship.serving.scheduler import Cancelled, DecodeScheduler, GenRequest, PoolFull

from test_serving_generate import get, post, stream_events


@pytest.fixture(scope="module")
def fused(zoo_ctx):
    ctx = zoo_ctx("gpt")
    v = AG.build_variant(ctx, "fp32-onnx-fused")
    return ctx, v, OrtSession(v.path, threads=1), KVLayout.of(G.config_of(ctx.spec))


def test_fused_variant_matches_torch_and_the_plain_graph(fused, zoo_ctx):
    ctx, v, sess, layout = fused
    assert v.info["parity_steps"]["ok"] and v.info["parity_steps"]["max_abs_logits"] < 1e-3
    plain = ctx.session(AG.build_variant(ctx, "fp32-onnx"), threads=1)
    ids = G.heldout_prompts(2, 40)
    a = ctx.session(v, threads=1).run({"input_ids": ids, **G.empty_past(G.config_of(ctx.spec), 2)})["logits"]
    b = plain.run({"input_ids": ids, **G.empty_past(G.config_of(ctx.spec), 2)})["logits"]
    assert np.abs(a - b).max() < 1e-3
    assert isinstance(ctx.session(v), FusedSession)


def test_a_batch_step_at_different_lengths_equals_each_row_alone(fused):
    _, _, sess, layout = fused
    pool = KVPool(sess, layout, 3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, layout.vocab_size, n) for n in (5, 17, 2)]
    for i, p in enumerate(prompts):
        pool.run(i, p[None])
    nxt = np.array([[7], [8], [9]])
    batched = pool.run(0, nxt)[:, -1]
    for i, p in enumerate(prompts):
        r = FusedRunner(sess, layout)
        r.reset(1)
        r.forward(p[None])
        alone = r.forward(nxt[i:i + 1])[0, -1]
        np.testing.assert_allclose(batched[i], alone, atol=1e-4)
    assert pool.lengths.tolist() == [6, 18, 3]
    with pytest.raises(InputSpecError, match="one row at a time"):
        pool.run(0, np.zeros((2, 3), np.int64))


def _requests(layout, n, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sampling = Sampling() if i % 3 else Sampling(greedy=False, temperature=0.8, top_k=40, seed=i)
        out.append((rng.integers(0, layout.vocab_size, int(rng.integers(3, 200))), int(rng.integers(1, 40)), sampling))
    return out


def test_scheduler_answers_equal_the_direct_loop_with_mixed_sampling(fused):
    _, _, sess, layout = fused
    reqs = _requests(layout, 12)
    direct = FusedRunner(sess, layout)
    ref = [generate(direct, p, m, sampling=s).row(0).tolist() for p, m, s in reqs]
    rows = []
    sch = DecodeScheduler(sess, layout, slots=5, max_queue=20, chunk=64,
                          observe=lambda e, **kw: rows.append(kw["rows"]) if e == "step" else None)
    try:
        futs = [sch.submit(GenRequest(p, m, s)) for p, m, s in reqs]
        got = [f.result(timeout=60).row(0).tolist() for f in futs]
    finally:
        sch.close()
    assert got == ref
    assert max(rows) == 5  # the pool was full: greedy and sampled rows decoded in one step


def test_requests_join_and_leave_at_step_boundaries(fused):
    _, _, sess, layout = fused
    rows: list[int] = []
    sch = DecodeScheduler(sess, layout, slots=4, max_queue=4,
                          observe=lambda e, **kw: rows.append(kw["rows"]) if e == "step" else None)
    try:
        started = threading.Event()
        a = sch.submit(GenRequest(np.arange(10), 60, on_tokens=lambda t: started.set()))
        started.wait(10)
        time.sleep(0.01)
        b = sch.submit(GenRequest(np.arange(20, 25), 5))
        rb, ra = b.result(30), a.result(30)
    finally:
        sch.close()
    assert ra.lengths[0] == 60 and rb.lengths[0] == 5
    i2 = rows.index(2)
    assert set(rows[:i2]) == {1} and rows[i2:i2 + 4] == [2, 2, 2, 2] and set(rows[i2 + 4:]) == {1}
    direct = FusedRunner(sess, layout)
    assert rb.row(0).tolist() == generate(direct, np.arange(20, 25), 5).row(0).tolist()
    assert ra.row(0).tolist() == generate(direct, np.arange(10), 60).row(0).tolist()


def test_a_cancelled_request_frees_its_slot_and_a_full_pool_refuses(fused):
    _, _, sess, layout = fused
    sch = DecodeScheduler(sess, layout, slots=2, max_queue=1)
    try:
        seen = []

        def leave_after_3(t):
            seen.append(int(t[0, 0]))
            if len(seen) == 3:
                raise ConnectionError("client went away")

        gone = sch.submit(GenRequest(np.arange(8), 100, on_tokens=leave_after_3))
        with pytest.raises(ConnectionError):
            gone.result(30)
        deadline = time.time() + 5
        while sch.in_use and time.time() < deadline:
            time.sleep(0.005)
        assert sch.in_use == 0 and len(seen) == 3
        hold = threading.Event()
        long = [GenRequest(np.arange(8), 300, on_tokens=lambda t: hold.wait(5)) for _ in range(3)]
        futs = [sch.submit(r) for r in long]  # 2 slots + 1 queued
        with pytest.raises(PoolFull, match="KV-cache slots"):
            sch.submit(GenRequest(np.arange(8), 5))
        for r in long:
            r.cancel()
        hold.set()
        for f in futs:
            with pytest.raises(Cancelled):
                f.result(30)
    finally:
        sch.close()


# ---- the endpoints ---------------------------------------------------------------------------------

NAME = "gpt-fp32-onnx-fused"  # the served name of the report row

@pytest.fixture(scope="module")
def server(fused, tmp_path_factory):
    ctx, v, _, _ = fused
    models = [{"model": "gpt", "inputs": [str(t) for t in ctx.spec.inputs],
               "variants": [{"variant": "fp32-onnx-fused", "format": "onnx", "status": "ok", "precision": "fp32",
                             "artifact": str(v.path)}]}]
    p = tmp_path_factory.mktemp("report") / "report.json"
    p.write_text(json.dumps({"schema_version": 1, "models": models}))
    srv = InferenceServer(load_repository([str(p)]), ServerConfig(port=0, threads=1, kv_slots=3))
    srv.config.batching.max_queue_size = 2
    with start_in_thread(srv) as running:
        yield running


def _metric(url: str, name: str) -> float:
    for line in get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_streams_equal_the_direct_loop(server, fused):
    _, _, sess, layout = fused
    prompts = ["ROMEO:\nWhat say you", "JULIET:\nO", "KING:\nNow", "First Citizen:\nWe are", "HAMLET:\nTo be"]
    results: dict[int, list] = {}

    def client(i: int):
        body = {"text_input": prompts[i], "parameters": {"max_tokens": 24}}
        _, events = stream_events(f"{server.url}/v2/models/{NAME}/generate_stream", body)
        results[i] = events

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    direct = FusedRunner(sess, layout)
    for i, text in enumerate(prompts):
        events = results[i]
        assert events[-1]["final"] and events[-1]["finish_reason"] == "length"
        toks = [t for e in events[:-1] for t in e["tokens"]]
        assert toks == generate(direct, G.encode(text), 24).row(0).tolist()
        assert "".join(e["text_output"] for e in events) == G.decode(toks)
    assert _metric(server.url, "deepship_decode_batch_rows_count") > 0
    assert _metric(server.url, "deepship_time_to_first_token_seconds_count") >= len(prompts)
    assert _metric(server.url, "deepship_kv_slots") == 3
    assert _metric(server.url, "deepship_kv_pool_bytes") == layout.cache_bytes(3, layout.context)


def test_a_client_that_leaves_frees_its_slot_and_a_full_pool_is_503(server):
    sch = next(fn.__self__ for fn in server.server.on_stop if isinstance(getattr(fn, "__self__", None), DecodeScheduler))
    gate, run = threading.Event(), sch.pool.run

    def slow_run(lo, ids, adapters=None):  # hold the loop until the pool and queue are full, then 2 ms a step
        gate.wait(20)
        time.sleep(0.002)
        return run(lo, ids, adapters)

    sch.pool.run = slow_run
    try:
        url = f"{server.url}/v2/models/{NAME}/generate_stream"
        body = json.dumps({"text_input": "ROMEO:\n", "parameters": {"max_tokens": 300}}).encode()
        conns = [urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60)
                 for _ in range(5)]  # 3 slots + 2 queued
        refused = post(f"{server.url}/v2/models/{NAME}/generate", {"text_input": "x", "parameters": {"max_tokens": 2}})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
        assert "KV-cache slots" in refused.json()["error"]
        gate.set()
        for r in conns:
            r.readline()
            r.close()  # gone mid-stream: 300 tokens take 0.6 s here
        deadline = time.time() + 20
        while time.time() < deadline and (_metric(server.url, "deepship_kv_slots_in_use")
                                          or _metric(server.url, "deepship_generate_queue_length")):
            time.sleep(0.05)
        assert _metric(server.url, "deepship_kv_slots_in_use") == 0
        assert sch.in_use == 0 and not sch.waiting
        assert 'deepship_requests_total{model="%s",status="499"}' % NAME in get(server.url + "/metrics").text
    finally:
        sch.pool.run = run
        gate.set()
    ok = post(f"{server.url}/v2/models/{NAME}/generate", {"text_input": "x", "parameters": {"max_tokens": 2}})
    assert ok.status_code == 200 and ok.json()["completion_tokens"] == 2


def test_greedy_generate_on_the_fused_decoder_and_its_runner(server, fused):
    _, _, sess, layout = fused
    res = post(f"{server.url}/v2/models/{NAME}/generate", {"text_input": "ROMEO:\nWhat say you", "max_tokens": 16})
    assert res.status_code == 200
    runner = make_runner(sess, layout)
    assert isinstance(runner, FusedRunner)
    assert res.json()["tokens"] == generate(runner, G.encode("ROMEO:\nWhat say you"), 16).row(0).tolist()


# ---- several LoRA adapters on one served base, chosen per request ------------------------------------

@pytest.fixture(scope="module")
def adapters(zoo_ctx, tmp_path_factory):
    """Two PEFT adapters on ``gpt`` with seeded random LoRA weights (rank 4 and rank 2, different targets)."""
    import torch

    from deepship.pipeline import finetune as FT

    ctx = zoo_ctx("gpt")
    out = {}
    for name, seed, rank, targets in (("a", 1, 4, ["qkv", "proj", "fc"]), ("b", 2, 2, ["fc"])):
        model = FT.lora_model(ctx.module(), FT.LoraOptions(rank=rank, alpha=2 * rank, targets=targets))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        out[name] = (FT.save_adapter(model, tmp_path_factory.mktemp("adapters") / name, {"model": "gpt"}), model)
    return out


def test_lora_branches_equal_the_peft_models_per_row(fused, adapters):
    import onnx
    import torch

    from deepship.exporters.fused import add_lora, read_peft_adapter

    ctx, v, _, layout = fused
    graph = add_lora(onnx.load(str(v.path)), [read_peft_adapter(adapters[n][0]) for n in ("a", "b")])
    sess = OrtSession(v.path, threads=1, model=graph)
    ids = G.heldout_prompts(1, 24)
    with torch.no_grad():
        want = [ctx.module()(torch.from_numpy(ids))[0].numpy()] + [adapters[n][1](torch.from_numpy(ids))[0].numpy()
                                                                  for n in ("a", "b")]
    pool = KVPool(sess, layout, 3)
    for i in range(3):
        np.testing.assert_allclose(pool.run(i, ids, np.array([i])), want[i], atol=1e-4)
    step = pool.run(0, np.array([[5], [5], [5]]), np.array([0, 1, 2]))[:, -1]  # three adapters in one step
    for i in range(3):
        r = FusedRunner(sess, layout, adapter=i)
        r.reset(1)
        r.forward(ids)
        np.testing.assert_allclose(step[i], r.forward(np.array([[5]]))[0, -1], atol=1e-4)
    assert np.abs(want[1] - want[0]).max() > 0.1  # the adapters change the outputs


def test_served_adapters_are_picked_per_request(fused, adapters, tmp_path):
    ctx, v, _, layout = fused
    models = [{"model": "gpt", "inputs": [str(t) for t in ctx.spec.inputs],
               "variants": [{"variant": "fp32-onnx-fused", "format": "onnx", "status": "ok", "precision": "fp32",
                             "artifact": str(v.path)}]}]
    p = tmp_path / "report.json"
    p.write_text(json.dumps({"schema_version": 1, "models": models}))
    cfg = ServerConfig(port=0, threads=1, kv_slots=4, adapters={n: str(adapters[n][0]) for n in ("a", "b")})
    srv = InferenceServer(load_repository([str(p)]), cfg)
    with start_in_thread(srv) as running:
        sch = next(fn.__self__ for fn in srv.on_stop if isinstance(getattr(fn, "__self__", None), DecodeScheduler))
        url = f"{running.url}/v2/models/{NAME}/generate"
        results = {}

        def client(adapter):
            body = {"text_input": "ROMEO:\nWhat say you", "parameters": {"max_tokens": 20}}
            if adapter:
                body["parameters"]["adapter"] = adapter
            results[adapter] = post(url, body).json()

        threads = [threading.Thread(target=client, args=(a,)) for a in (None, "a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, a in enumerate((None, "a", "b")):
            direct = generate(FusedRunner(sch.pool.session, layout, adapter=i), G.encode("ROMEO:\nWhat say you"), 20)
            assert results[a]["tokens"] == direct.row(0).tolist()
            assert results[a].get("adapter") == a
        assert results["a"]["tokens"] != results[None]["tokens"]
        bad = post(url, {"text_input": "x", "parameters": {"adapter": "c"}})
        assert bad.status_code == 400 and "adapters: a, b" in bad.json()["error"]
        spec = post(url, {"text_input": "x", "parameters": {"adapter": "a", "speculative": True}})
        assert spec.status_code == 400


def test_an_adapter_for_another_model_fails_start_up(fused, adapters, tmp_path):
    import shutil

    from deepship.serving.app import create_app
    from deepship.serving.repository import ServingError

    ctx, v, _, _ = fused
    other = tmp_path / "other"
    shutil.copytree(adapters["a"][0], other)
    (other / "deepship.json").write_text(json.dumps({"model": "gpt-draft"}))
    models = [{"model": "gpt", "inputs": [str(t) for t in ctx.spec.inputs],
               "variants": [{"variant": "fp32-onnx-fused", "format": "onnx", "status": "ok", "precision": "fp32",
                             "artifact": str(v.path)}]}]
    p = tmp_path / "report.json"
    p.write_text(json.dumps({"schema_version": 1, "models": models}))
    srv = InferenceServer(load_repository([str(p)]), ServerConfig(port=0, threads=1, kv_slots=2,
                                                                  adapters={"x": str(other)}))
    with pytest.raises(ServingError, match="--adapter x: no served fused-attention decoder"):
        create_app(srv)
