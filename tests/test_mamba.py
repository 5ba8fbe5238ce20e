"""Mamba (selective SSM, SSD form): parallel form = recurrence, causality, step graph, ONNX at two
lengths, INT8 through the pipeline, the committed model against the bigram, the seeded recipe.

Tiny random models for the exactness checks (module fixtures export them once); the trained ``mamba``
comes from the committed weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deepship.errors import InputSpecError
from deepship.models import gpt as G
from deepship.models import mamba as M
from deepship.pipeline.arch import mamba as AM
from deepship.runtimes.session import OrtSession, TorchSession

TINY = M.MambaConfig(n_layer=2, d_model=32, head_dim=16, d_state=8, chunk=8)


def _tiny(seed: int = 0) -> M.Mamba:
    torch.manual_seed(seed)
    m = M.Mamba(TINY).eval()
    with torch.no_grad():  # larger projections and step sizes than the init: states and gates matter
        for blk in m.blocks:
            blk.in_proj.weight.mul_(8.0)
            blk.out_proj.weight.mul_(20.0)
            blk.dt_bias.add_(2.0)
    return m


def _sequential_ssm(x, dt, A, B, C):
    """Reference: the recurrence H_t = exp(dt_t A) H_{t-1} + dt_t x_t B_t^T, y_t = H_t C_t, loop over time."""
    b, L, H, P = x.shape
    h = torch.zeros(b, H, P, B.shape[-1], dtype=x.dtype)
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, t] * A)                                        # (b, H)
        h = h * dA[:, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", h, C[:, t]))
    return torch.stack(ys, 1), h


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    from deepship.exporters.mamba import export_step_graph
    from deepship.exporters.onnx import export_onnx
    from deepship.pipeline.parity import parity

    d = tmp_path_factory.mktemp("mamba")
    spec = M.mamba_spec()
    whole = export_onnx(tiny, spec, d / "model.onnx")
    whole.parity = parity(tiny, spec, whole.path)
    res = export_step_graph(tiny, d / "step.onnx")
    step = {"path": res.path, **AM.check_step_graph(tiny, res.path, steps=32)}
    return whole, step


@pytest.fixture(scope="module")
def trained():
    return M.load_trained()


# ---- the SSM itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 7, 48])
def test_ssd_parallel_equals_sequential_recurrence(L):
    rng = torch.Generator().manual_seed(L)
    b, H, P, N = 2, 3, 4, 5
    x = torch.randn(b, L, H, P, generator=rng)
    dt = torch.nn.functional.softplus(torch.randn(b, L, H, generator=rng))
    A = -torch.rand(H, generator=rng) * 8 - 0.5
    B, C = torch.randn(b, L, N, generator=rng), torch.randn(b, L, N, generator=rng)
    ref, h_ref = _sequential_ssm(x, dt, A, B, C)
    y, h = M.ssd(x, dt, A, B, C, return_state=True)
    assert y.shape == (b, L, H, P) and h.shape == (b, H, P, N)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    if L % 8 == 0:  # the chunked training path (6 chunks of 8) is the same map
        torch.testing.assert_close(M.ssd_chunked(x, dt, A, B, C, 8), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputSpecError):
        M.ssd_chunked(x[:, :5], dt[:, :5], A, B[:, :5], C[:, :5], 8) if L >= 5 else M.ssd_chunked(
            torch.zeros(1, 5, H, P), torch.ones(1, 5, H), A, torch.zeros(1, 5, N), torch.zeros(1, 5, N), 8)


def test_segsum_is_masked_before_exp_and_gradients_are_finite():
    a = (-torch.rand(2, 3, 50) * 30).requires_grad_()  # strong decay: long segments underflow to 0
    s = M.segsum(a)
    assert torch.isneginf(s[..., 0, 1:]).all() and (s.diagonal(dim1=-2, dim2=-1) == 0).all()
    torch.testing.assert_close(s[..., 9, 2], a[..., 3:10].sum(-1))
    torch.exp(s).sum().backward()
    assert torch.isfinite(a.grad).all()


def test_causality_changing_token_t_leaves_earlier_logits(tiny):
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 1024, (2, 32)))
    t = 19
    other = ids.clone()
    other[:, t] = (other[:, t] + 7) % 1024
    for train_mode in (False, True):  # chunked SSD (32 = 4 chunks of 8); eval: Conv1d, train: shifted sums
        tiny.train(train_mode)
        with torch.no_grad():
            a, b = tiny(ids)[0], tiny(other)[0]
        assert torch.equal(a[:, :t], b[:, :t])
        assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-3  # ... and later ones do change
    tiny.eval()


def test_step_recurrence_and_prefill_equal_whole_sequence(tiny):
    ids = torch.from_numpy(np.random.default_rng(4).integers(0, 1024, (3, 40)))
    with torch.no_grad():
        full = tiny(ids)[0]
        tiny.train()
        shifted = tiny(ids)[0]  # training path (shifted-sum conv): the same function
        tiny.eval()
        pre = tiny.prefill(ids[:, :25])  # quadratic SSD form with the final states
        states = list(pre[1:])
        steps = [pre[0]]
        for t in range(25, 40):
            out = tiny.step(ids[:, t:t + 1], *states)
            steps.append(out[0])
            states = list(out[1:])
    torch.testing.assert_close(shifted, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # streaming from zero states through the torch step session gives the same logits
    logits, _ = M.stream_logits(AM.step_session_torch(tiny, threads=1), TINY, ids.numpy())
    np.testing.assert_allclose(logits, full.numpy(), atol=1e-5, rtol=1e-5)
    shapes = M.state_shapes(TINY, 3)
    assert [tuple(s.shape) for s in states] == list(shapes.values())
    assert shapes["conv_state.0"] == (3, TINY.conv_channels, TINY.d_conv - 1)
    assert shapes["ssm_state.1"] == (3, TINY.n_heads, TINY.head_dim, TINY.d_state)


# ---- ONNX ---------------------------------------------------------------------------------------------

def test_whole_sequence_onnx_runs_at_two_lengths(tiny, exported):
    import onnx

    whole, _ = exported
    assert whole.parity["ok"] and whole.parity["second_shape"]["max_abs"] < 1e-4
    g = onnx.load(str(whole.path))
    dims = [d.dim_param or d.dim_value for d in g.graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) and d for d in dims), dims  # batch and seq stay dynamic
    sess = OrtSession(whole.path, threads=1)
    for b, L in ((1, 5), (2, 77)):
        ids = np.random.default_rng(L).integers(0, 1024, (b, L))
        with torch.no_grad():
            ref = tiny(torch.from_numpy(ids))[0].numpy()
        out = sess.run({"input_ids": ids})["logits"]
        assert out.shape == (b, L, TINY.vocab_size)
        np.testing.assert_allclose(out, ref, atol=1e-4)


def test_step_graph_onnx_matches_over_32_steps(tiny, exported):
    import onnx

    _, step = exported
    sp = step["steps"]
    assert sp["ok"] and sp["steps"] == 32 and sp["same_argmax"] == 1.0
    assert sp["max_abs_logits"] < 1e-4 and sp["max_abs_state"] < 1e-4
    g = onnx.load(str(step["path"]))
    assert [i.name for i in g.graph.input] == ["input_ids"] + M.state_names(TINY)
    assert [o.name for o in g.graph.output] == ["logits"] + M.state_names(TINY, "next_")
    assert isinstance(g.graph.input[1].type.tensor_type.shape.dim[0].dim_param, str)
    # greedy generation: ONNX step graph == torch step == argmax of the whole-sequence forward
    sess = OrtSession(step["path"], threads=1)
    prompt = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = M.generate(sess, TINY, prompt, 12)
    np.testing.assert_array_equal(out, M.generate(AM.step_session_torch(tiny, threads=1), TINY, prompt, 12))
    seq = np.concatenate([prompt, out[:, :-1]], 1)
    with torch.no_grad():
        ref = tiny(torch.from_numpy(seq))[0].numpy()[:, prompt.shape[1] - 1:].argmax(-1)
    np.testing.assert_array_equal(out, ref)
    for bad in ([], [3, 1024]):
        with pytest.raises(InputSpecError):
            M.generate(sess, TINY, bad, 4)


# ---- the trained model -----------------------------------------------------------------------------------

def test_spec_and_plan():
    from deepship.models import resolve

    spec = resolve("mamba")
    assert spec.metric.name == "perplexity" and not spec.metric.higher_is_better
    assert [t.describe() for t in spec.inputs] == ["input_ids:int64[batch,seq]"] and spec.output_names == ["logits"]
    assert [p[0] for p in AM.plan(spec, [])] == ["fp32-onnx", "int8-dynamic", "int4-b32"]
    ds = spec.data()
    assert list(ds.test.inputs) == ["input_ids"] and ds.test.inputs["input_ids"].shape == (G.REPORT_PROMPTS, 64)
    assert 1.2e6 < sum(p.numel() for p in M.build().parameters()) < 1.6e6  # about the GPT's 1.37M


def test_committed_model_beats_the_bigram(trained):
    """On the same 8 held-out windows of 384 tokens (a quarter of a minute; docs/mamba.md has all
    held-out tokens): the model's perplexity against the add-0.1 token bigram fitted on the training text."""
    model, cfg = trained
    ids = G.corpus()[1][: 8 * cfg.context + 1]
    ppl = M.perplexity(TorchSession(model, ["input_ids"], ["logits"], threads=2), cfg, ids=ids)
    train = G.corpus()[0]
    counts = np.full((cfg.vocab_size, cfg.vocab_size), 0.1)
    np.add.at(counts, (train[:-1], train[1:]), 1.0)
    logp = np.log(counts / counts.sum(1, keepdims=True))
    targets = np.stack([ids[i:i + cfg.context + 1] for i in range(0, 8 * cfg.context, cfg.context)])
    bigram = float(np.exp(-logp[targets[:, :-1], targets[:, 1:]].mean()))  # the tokens the model predicts
    assert np.isfinite(ppl) and ppl < 0.85 * bigram, (ppl, bigram)


def test_int8_dynamic_through_the_pipeline_is_close_to_fp32():
    from deepship import api

    ctx = api.load("mamba")
    fp32 = api.export(ctx)
    assert fp32.info["parity"]["second_shape"]["shape"]["input_ids"] == [3, 23]
    q = api.quantize(ctx, "int8-dynamic")
    assert q.info["nodes"]["quantized"] and q.size_bytes() < 0.6 * fp32.size_bytes()
    ids = G.corpus()[1][: 4 * 384 + 1]  # 4 held-out windows: a few seconds per variant
    ppl = {v.name: M.perplexity(ctx.session(v, threads=1), ids=ids) for v in (ctx.baseline(), fp32, q)}
    assert all(np.isfinite(p) for p in ppl.values())
    assert ppl["fp32-onnx"] == pytest.approx(ppl["fp32-torch"], rel=1e-4)
    assert ppl["int8-dynamic"] == pytest.approx(ppl["fp32-torch"], rel=0.05), ppl


def test_tiny_recipe_is_seeded_and_learns(heldout_lm_loss):
    cfg = M.MambaConfig(n_layer=1, d_model=32, head_dim=16, d_state=8, chunk=16)
    recipe = {**M.RECIPE, "arch": cfg.to_dict(), "steps": 80, "batch_size": 8, "seq_len": 32, "warmup": 10,
              "threads": 1, "lr": 1e-2}
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = M.build(cfg.to_dict())
        untrained = heldout_lm_loss(m.eval())
        stats = M.train_mamba(m, None, recipe)
        assert stats["train_s"] > 0 and np.isfinite(stats["final_loss"])
        models.append(m)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    loss = heldout_lm_loss(models[0])
    assert loss < untrained - 1.0 and loss < np.log(cfg.vocab_size) - 1.0, (untrained, loss)
