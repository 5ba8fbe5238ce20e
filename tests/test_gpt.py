"""GPT decoder: tokenizer, KV cache, ONNX export parity, generation, speculative decoding, bad input.

Everything runs on a CPU with 2 cores; the ONNX export is done once for a tiny random model (module
fixture), and the trained ``gpt``/``gpt-draft`` come from the committed weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deepship.errors import InputSpecError
from deepship.models import gpt as G
from deepship.pipeline.arch import gpt as AG
from deepship.pipeline import finetune as AF
from deepship.runtimes import generate as R
from deepship.runtimes import kvcache as K
from deepship.runtimes import sampling as Smp
from deepship.runtimes.session import OrtSession, TorchSession

TINY = G.GPTConfig(vocab_size=1024, context=64, n_layer=2, n_head=2, d_model=32)
TINY_DRAFT = G.GPTConfig(vocab_size=1024, context=64, n_layer=1, n_head=2, d_model=16)


def _tiny(cfg: G.GPTConfig, seed: int) -> G.GPT:
    torch.manual_seed(seed)
    m = G.GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so greedy paths are not degenerate
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return m


def _torch_session(m: G.GPT) -> TorchSession:
    return TorchSession(m, G.input_names(m.cfg), G.output_names(m.cfg), threads=1)


@pytest.fixture(scope="module")
def tiny():
    return _tiny(TINY, 0)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    from deepship.exporters.kv import export_kv

    d = tmp_path_factory.mktemp("kv")
    res = export_kv(tiny, TINY, d)
    res.parity = AG.check_kv_export(tiny, TINY, res, prompt=np.random.default_rng(0).integers(0, 1024, (2, 16)))
    return res


@pytest.fixture(scope="module")
def trained():
    target, tcfg = G.load_trained("gpt")
    draft, dcfg = G.load_trained("gpt-draft")
    return target, tcfg, draft, dcfg


# ---- tokenizer -------------------------------------------------------------------------------------

def test_tokenizer_round_trip_on_heldout_and_unusual_text():
    held = G.shakespeare_text()[1]
    for text in (held[:5000], "Hello wörld ✓ — naïve café\n\n\tKING RICHARD III:", " leading and  double  spaces "):
        ids = G.encode(text)
        assert ids.dtype == np.int64 and ids.max() < G.TARGET.vocab_size
        assert G.decode(ids) == text
    assert G.tokenizer().get_vocab_size() == G.TARGET.vocab_size
    assert G.tokenizer().token_to_id(G.EOS) == 0
    # BPE compresses: well under one token per character on prose
    assert len(G.encode(held[:5000])) < 0.6 * 5000


def test_heldout_text_is_kept_apart():
    train, held = G.shakespeare_text()
    assert held and train and not train.endswith(held[:200])
    assert len(held) / (len(train) + len(held)) == pytest.approx(G.HELDOUT_FRACTION, abs=0.01)
    tr_ids, he_ids = G.corpus()
    assert len(he_ids) > 10_000 and len(tr_ids) > 8 * len(he_ids)


# ---- KV cache ---------------------------------------------------------------------------------------

def test_kv_cache_decode_equals_full_recompute(tiny):
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 1024, (3, 40)))
    with torch.no_grad():
        full = tiny(ids)[0]
        out = tiny(ids[:, :10])
        steps, cache = [out[0]], list(out[1:])
        for t in range(10, 40, 3):  # chunks of 3 tokens, then 1 at the end
            out = tiny(ids[:, t:t + 3], *cache)
            steps.append(out[0])
            cache = list(out[1:])
    inc = torch.cat(steps, 1)
    assert inc.shape == full.shape
    assert torch.allclose(inc, full, atol=1e-5, rtol=1e-4)
    assert cache[0].shape == (3, TINY.n_head, 40, TINY.head_dim)


def test_generation_runners_agree_torch_and_onnx(tiny, exported):
    prompt = np.random.default_rng(2).integers(0, 1024, (2, 7))
    layout = K.KVLayout.of(TINY)
    dec, pre = OrtSession(exported.decode, threads=1), OrtSession(exported.prefill, threads=1)
    runners = {"torch-arrays": K.make_runner(_torch_session(tiny), layout),
               "ort-arrays": K.make_runner(dec, layout, mode="arrays"),
               "ort-iobinding": K.make_runner(dec, layout, pre, mode="iobinding"),
               "ort-iobinding-no-prefill": K.make_runner(dec, layout, mode="iobinding"),
               "ort-auto": K.make_runner(dec, layout, pre),
               "recompute": K.make_runner(dec, layout, pre, mode="recompute")}
    outs = {k: R.generate(r, prompt, 30).tokens for k, r in runners.items()}
    for k, v in outs.items():
        assert v.shape == (2, 30)
        np.testing.assert_array_equal(v, outs["torch-arrays"], err_msg=k)
    assert isinstance(runners["ort-iobinding"], K.IOBindingKVRunner)


def test_generate_limits_stops_and_context(tiny):
    layout = K.KVLayout.of(TINY)
    r = K.make_runner(_torch_session(tiny), layout)
    ref = R.generate(r, [5, 6, 7], 20).row(0)
    stop = int(ref[4])
    res = R.generate(r, [5, 6, 7], 20, stop_tokens=[stop])
    first = int(np.flatnonzero(ref == stop)[0])
    assert res.finish_reasons == ["stop"] and res.lengths[0] == first + 1 and res.row(0)[-1] == stop
    res = R.generate(r, np.arange(60), 50)  # 60-token prompt, context 64: 5 new tokens fit
    assert res.finish_reasons == ["context"] and res.lengths[0] == 5
    res = R.generate(r, [1, 2], 8, Smp.Sampling(greedy=False, temperature=0.8, top_k=20, top_p=0.9, seed=3))
    again = R.generate(r, [1, 2], 8, Smp.Sampling(greedy=False, temperature=0.8, top_k=20, top_p=0.9, seed=3))
    np.testing.assert_array_equal(res.tokens, again.tokens)  # seeded


def test_top_k_top_p_filters():
    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = Smp.probabilities(logits, Smp.Sampling(greedy=False, top_k=2))
    np.testing.assert_allclose(p, [[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]], atol=1e-12)
    p = Smp.probabilities(logits, Smp.Sampling(greedy=False, top_p=0.8))  # 0.5+0.2 < 0.8 -> keep 3
    np.testing.assert_allclose(p, [[0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]], atol=1e-12)
    p = Smp.probabilities(logits, Smp.Sampling(greedy=False, top_p=0.3))  # the top token alone
    np.testing.assert_allclose(p, [[1, 0, 0, 0, 0]], atol=1e-12)
    assert Smp.probabilities(logits, Smp.Sampling()).argmax() == 0


# ---- ONNX export ------------------------------------------------------------------------------------

def test_onnx_parity_prefill_and_32_decode_steps(exported):
    import onnx

    st = exported.parity["steps"]
    assert st["ok"] and st["steps"] == 32 and st["same_argmax"] == 1.0
    assert st["max_abs_logits"] < 1e-4 and st["max_abs_cache"] < 1e-4
    for g in ("decode", "prefill"):
        assert exported.parity[g]["ok"] and exported.parity[g]["second_shape"]["max_abs"] < 1e-4
    m = onnx.load(str(exported.decode))
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    assert list(ins) == G.input_names(TINY) and list(outs) == G.output_names(TINY)
    b, h, p, d = ins["past_key_values.1.value"]
    assert isinstance(b, str) and isinstance(p, str) and (h, d) == (TINY.n_head, TINY.head_dim)
    assert all(isinstance(x, str) for x in ins["input_ids"])
    assert [i.name for i in onnx.load(str(exported.prefill)).graph.input] == ["input_ids"]
    # both graphs point into one external-data file: the weights are stored once
    data = [f for f in exported.files if f.suffix == ".bin"]
    assert len(data) == 1
    for g in (exported.decode, exported.prefill):
        locs = {kv.value for t in onnx.load(str(g), load_external_data=False).graph.initializer
                for kv in t.external_data if kv.key == "location"}
        assert locs == {data[0].name}
    # the decode graph also takes an empty cache and several new tokens (verification pass)
    sess = OrtSession(exported.decode, threads=1)
    out = sess.run({"input_ids": np.array([[1, 2, 3]]), **G.empty_past(TINY, 1)})
    assert out["logits"].shape == (1, 3, 1024) and out["present.0.key"].shape == (1, 2, 3, 16)


# ---- speculative decoding ---------------------------------------------------------------------------

def test_speculative_greedy_equals_target_greedy_tiny_onnx(tiny, exported):
    """Cache rollback (IOBinding ping-pong buffers and arrays): a weak draft makes many rejections."""
    layout = K.KVLayout.of(TINY)
    dec, pre = OrtSession(exported.decode, threads=1), OrtSession(exported.prefill, threads=1)
    draft = K.make_runner(_torch_session(_tiny(TINY_DRAFT, 5)), K.KVLayout.of(TINY_DRAFT))
    prompt = np.random.default_rng(4).integers(0, 1024, 9)
    for mode in ("iobinding", "arrays"):
        target = K.make_runner(dec, layout, pre, mode=mode)
        ref = R.generate(target, prompt, 40).row(0)
        for k in (1, 3, 6):
            res = R.speculative_generate(target, draft, prompt, 40, k=k)
            np.testing.assert_array_equal(res.row(0), ref, err_msg=f"{mode} k={k}")
            assert res.proposed > 0 and 0 <= res.accepted <= res.proposed and res.rejected > 0


def test_greedy_proposer_equals_k_decode_steps(exported):
    """The unrolled proposal graph gives the step graph's argmax chain and the cache k steps leave."""
    import onnx

    from deepship.errors import ExportError
    from deepship.runtimes.proposer import greedy_proposer

    dec = OrtSession(exported.decode, threads=1)
    layout = K.KVLayout.of(TINY)
    rng = np.random.default_rng(3)
    past = {n: rng.standard_normal((2, layout.n_head, 7, layout.head_dim)).astype(np.float32) for n in layout.past_names}
    ids = rng.integers(0, 1024, (2, 3))
    for k in (1, 4):
        prop = OrtSession(exported.decode, threads=1,
                          model=greedy_proposer(onnx.load(str(exported.decode), load_external_data=False), k))
        out = prop.run({"input_ids": ids, **past})
        feeds, toks = {"input_ids": ids, **past}, []
        for j in range(k):
            o = dec.run(feeds)
            toks.append(o["logits"][:, -1].argmax(-1))
            if j < k - 1:
                feeds = {"input_ids": toks[-1][:, None], **{p: o[q] for p, q in zip(layout.past_names, layout.present_names)}}
        np.testing.assert_array_equal(out["tokens"], np.stack(toks, 1))
        for q in layout.present_names:
            assert out[q].shape == (2, layout.n_head, 7 + 3 + k - 1, layout.head_dim)
            np.testing.assert_allclose(out[q], o[q], atol=1e-6)  # the k-th step's present: ids + x_1..x_{k-1}
    with pytest.raises(ExportError, match="positive integer"):
        greedy_proposer(onnx.load(str(exported.decode), load_external_data=False), 0)
    with pytest.raises(ExportError, match="input_ids"):
        greedy_proposer(onnx.load(str(exported.prefill), load_external_data=False), 2)


def test_speculative_fused_proposals_keep_the_target_greedy_output(tiny, exported):
    """An ONNX draft (fused proposal graph) for a different torch target: many rejections, and a
    generation limit that leaves a last round shorter than k (served by the larger graph, cut back)."""
    dec = OrtSession(exported.decode, threads=1)
    prompt = np.random.default_rng(4).integers(0, 1024, 9)
    target = K.make_runner(_torch_session(_tiny(TINY, 7)), K.KVLayout.of(TINY))
    draft = K.make_runner(dec, K.KVLayout.of(TINY))
    step_draft = K.ArrayKVRunner(dec, K.KVLayout.of(TINY), fuse_proposals=False)
    ref = R.generate(target, prompt, 45).row(0)
    for k in (1, 3, 6):
        res = R.speculative_generate(target, draft, prompt, 45, k=k)
        np.testing.assert_array_equal(res.row(0), ref, err_msg=f"k={k}")
        assert res.rejected > 0
        steps = R.speculative_generate(target, step_draft, prompt, 45, k=k)  # same proposals, k calls each
        assert (steps.proposed, steps.accepted) == (res.proposed, res.accepted)
    assert draft._proposers.get(3) is not None and draft._proposers.get(6) is not None  # fused graphs were used
    assert K.make_runner(dec, K.KVLayout.of(TINY))._proposers is draft._proposers  # built once per session
    assert K.ArrayKVRunner(_torch_session(tiny), K.KVLayout.of(TINY))._proposers == {}  # torch: the step loop
    # a smaller k is served by the k=3 graph and cut back: same tokens and cache as 2 step calls
    for r in (draft, step_draft):
        r.reset(1)
        r.forward(prompt[None, :5])
    greedy = Smp.Sampling()
    got, want = (r.propose(prompt[None, 5:], 2, greedy, np.random.default_rng(0)) for r in (draft, step_draft))
    assert got == want and draft.length == step_draft.length == 9 + 1 and 2 not in draft._proposers
    for a, b in zip(draft.cache, step_draft.cache):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_speculative_greedy_equals_target_greedy_on_real_prompts(trained):
    target, tcfg, draft, dcfg = trained
    t = K.make_runner(_torch_session(target), K.KVLayout.of(tcfg))
    d = K.make_runner(_torch_session(draft), K.KVLayout.of(dcfg))
    prompts = ["ROMEO:\nBut soft, what light", "KING HENRY VI:\nWhat says my lord of Warwick?",
               G.shakespeare_text()[1][1000:1200]]
    acc = []
    for text in prompts:
        ids = G.encode(text)
        ref = R.generate(t, ids, 48).row(0)
        for k in (2, 5):
            res = R.speculative_generate(t, d, ids, 48, k=k)
            np.testing.assert_array_equal(res.row(0), ref, err_msg=f"{text[:20]!r} k={k}")
            assert res.target_calls < 48  # fewer target passes than tokens
            acc.append(res.acceptance_rate)
    assert 0.0 < min(acc) and max(acc) <= 1.0


class _TableRunner(K.KVRunner):
    """A toy 'model' over a small vocabulary: next-token logits are a table row picked by the last
    token (a bigram model). Cache = the token history, so truncation is exact."""

    def __init__(self, table: np.ndarray, context: int = 64):
        self.table = table
        self.layout = K.KVLayout(1, 1, 1, table.shape[0], context)

    def reset(self, batch):
        self.batch, self.length, self.hist = batch, 0, np.zeros((batch, 0), np.int64)

    def forward(self, ids):
        self._check(ids)
        self.hist = np.concatenate([self.hist, ids], 1)
        self.length = self.hist.shape[1]
        return self.table[ids]

    def truncate(self, n):
        self.hist, self.length = self.hist[:, :n], min(self.length, n)


def test_speculative_sampling_keeps_the_target_distribution():
    """Chi-square test: the first 3 tokens after a fixed prompt from speculative sampling (k=2,
    a draft that disagrees with the target) against the target's exact distribution, computed by
    enumeration. The draft's own distribution must fail the same test (the test has power)."""
    from scipy.stats import chisquare

    V = 4
    rng = np.random.default_rng(0)
    tgt = rng.normal(0, 1.5, (V, V))
    drf = tgt + rng.normal(0, 1.5, (V, V))
    sampling = Smp.Sampling(greedy=False, temperature=1.0)

    def exact(table):
        p = Smp.probabilities(table, sampling)  # row = last token
        out = np.zeros((V, V, V))
        for a in range(V):
            for b in range(V):
                for c in range(V):
                    out[a, b, c] = p[1, a] * p[a, b] * p[b, c]
        return out.reshape(-1)

    n = 6000
    counts = np.zeros(V ** 3)
    t, d = _TableRunner(tgt), _TableRunner(drf)
    for i in range(n):
        res = R.speculative_generate(t, d, [1], 3, k=2, sampling=Smp.Sampling(greedy=False, seed=i))
        a, b, c = res.row(0)
        counts[(a * V + b) * V + c] += 1
    p_target, p_draft = exact(tgt), exact(drf)
    assert chisquare(counts, p_target * n).pvalue > 1e-3
    assert chisquare(counts, p_draft * n).pvalue < 1e-6


# ---- bad input ---------------------------------------------------------------------------------------

def test_bad_input_errors(tiny):
    layout = K.KVLayout.of(TINY)
    r = K.make_runner(_torch_session(tiny), layout)
    d = K.make_runner(_torch_session(_tiny(TINY_DRAFT, 1)), K.KVLayout.of(TINY_DRAFT))
    cases = [
        (lambda: R.generate(r, [], 5), "empty"),
        (lambda: R.generate(r, np.arange(64) % 1000, 5), "context"),
        (lambda: R.generate(r, [3, 1024], 5), "unknown token id 1024"),
        (lambda: R.generate(r, [3, -1], 5), "unknown token id -1"),
        (lambda: R.generate(r, [3], 0), "max_new_tokens 0"),
        (lambda: R.generate(r, [3], 5, Smp.Sampling(greedy=False, top_p=1.5)), "top-p"),
        (lambda: R.speculative_generate(r, d, [3], 5, k=0), "--k 0"),
        (lambda: R.speculative_generate(r, d, [3], 5, k=-2), "--k -2"),
        (lambda: R.speculative_generate(r, d, [[3], [4]], 5, k=2), "one prompt at a time"),
        (lambda: R.speculative_generate(r, _TableRunner(np.zeros((8, 8))), [3], 5, k=2), "vocabulary"),
        (lambda: G.encode(""), "empty"),
        (lambda: G.decode([5000]), "outside the vocabulary"),
    ]
    for fn, words in cases:
        with pytest.raises(InputSpecError) as e:
            fn()
        msg = str(e.value)
        assert words in msg and "\n" not in msg, msg


def test_cli_generate_bad_input_exits_2():
    from typer.testing import CliRunner

    from deepship.cli import app

    for args, words in ((["generate", "gpt", "--prompt", ""], "empty"),
                        (["generate", "gpt", "--prompt", "ROMEO:", "--speculative", "--k", "0"], "--k 0"),
                        (["generate", "gpt", "--prompt", "x" * 2000], "context"),
                        (["generate", "gpt", "--prompt", "ROMEO:", "--stop", "ROMEO and JULIET"], "one token")):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert words in " ".join(res.output.split()), res.output


def test_zoo_specs_and_bigram_reference():
    from deepship.models import resolve

    spec, dspec = resolve("gpt"), resolve("gpt-draft")
    assert spec.metric.name == "perplexity" and not spec.metric.higher_is_better
    assert [t.name for t in spec.inputs] == G.input_names(G.TARGET)
    assert G.config_of(dspec).vocab_size == G.config_of(spec).vocab_size
    assert G.config_of(dspec).n_layer < G.config_of(spec).n_layer
    plan = AG.plan(spec, [])
    lora = (["lora-python-docs", "lora-python-docs-onnx", "lora-python-docs-int4-b32"]
            if AF.text_available("python-docs") else [])
    assert [p[0] for p in plan] == ["fp32-onnx", "fp32-onnx-fused", "int8-dynamic", "int4-b32", "int4-b128", "pruned-structured-50",
                                    "pruned-structured-50-onnx", "pruned-structured-50-int4-b32", *lora]
    assert [p[0] for p in AG.plan(dspec, [])] == ["fp32-onnx", "fp32-onnx-fused", "int8-dynamic", "int4-b32", "int4-b128"]
    b = G.bigram_baseline()
    assert b["metric"] == "perplexity" and 10 < b["value"] < G.TARGET.vocab_size


def test_training_recipes_run_tiny_and_learn(heldout_lm_loss):
    """The target's recipe and the draft's distillation recipe (with a pool of target-written text), on
    a tiny configuration: both bring the held-out loss well under the uniform ``log(vocab)``."""
    cfg = G.GPTConfig(vocab_size=G.TARGET.vocab_size, context=32, n_layer=1, n_head=2, d_model=32)
    base = {**G.TARGET_RECIPE, "arch": cfg.to_dict(), "steps": 120, "batch_size": 8, "seq_len": 32,
            "warmup": 10, "threads": 1}
    target = G.GPT(cfg)
    untrained = heldout_lm_loss(target.eval())
    stats = G.train_gpt(target, None, base)
    assert stats["train_s"] > 0 and np.isfinite(stats["final_loss"])
    t_loss = heldout_lm_loss(target)
    assert t_loss < untrained - 1.0 and t_loss < np.log(cfg.vocab_size) - 1.0, (untrained, t_loss)

    pool = G.target_continuations(target, cfg, {"sequences": 4, "prompt_tokens": 8, "greedy_fraction": 0.5,
                                                "temperature": 1.0, "batch": 2, "seed": 1, "threads": 1})
    assert pool.shape == (4, cfg.context + 1) and pool.dtype == np.int64
    dcfg = G.GPTConfig(vocab_size=cfg.vocab_size, context=32, n_layer=1, n_head=2, d_model=16)
    draft = G.GPT(dcfg)
    G.train_gpt(draft, None, {**base, "arch": dcfg.to_dict(), "kd_temperature": 1.0, "kd_alpha": 0.1,
                              "pool_batch": 2}, teacher=target, pool=pool)
    d_loss = heldout_lm_loss(draft)
    assert d_loss < np.log(cfg.vocab_size) - 1.0, d_loss
