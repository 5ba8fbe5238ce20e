"""Pruning and distillation stages (deepship.pipeline.prune / distill): parameters really removed,
pruned models export with parity, the Hinton et al. loss on a hand-computed case, CLI errors for
architectures that cannot be pruned, one sweep row per sparsity. No timing is asserted."""
from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn as nn

os.environ.setdefault("DEEPSHIP_CACHE", tempfile.mkdtemp(prefix="deepship-prune-test-"))

from deepship import api  # noqa: E402
from deepship.errors import StageError  # noqa: E402
from deepship.models import losses as L  # noqa: E402
from deepship.pipeline import distill as D  # noqa: E402
from deepship.pipeline import prune as P  # noqa: E402

# ---- user-model factories for the CLI (importable as test_prune_distill:NAME) -----------------------

def stacked_lstm():
    """A 2-layer LSTM forecaster: hidden-unit pruning here handles single-layer RNNs only."""

    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.rnn = nn.LSTM(1, 8, num_layers=2, batch_first=True)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    return Stacked()


def linear_only():
    """Logistic regression: its only layer produces the output, so no channel can go."""
    torch.manual_seed(0)
    return nn.Linear(6, 3)


def small_mlp():
    """A user MLP (nn.Sequential): no zoo build(arch), so a pruned copy is saved as .pt2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.fixture(scope="module")
def ctxs():
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = api.load(name)
        return cache[name]

    return get


@pytest.fixture
def run_cli():
    from typer.testing import CliRunner

    from deepship.cli import app

    def run(*args: str):
        res = CliRunner().invoke(app, [str(a) for a in args])
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        return res.exit_code, res.stdout, res.stderr

    return run


# ---- structured pruning ----------------------------------------------------------------------------

def test_structured_prune_removes_channels_and_exports_with_parity(ctxs):
    ctx = ctxs("cnn")
    before = sum(p.numel() for p in ctx.module().parameters())
    v = api.prune(ctx, 0.5, "structured", finetune_steps=20)
    assert v.format == "torch" and v.info["arch"] == {"c1": 16, "c2": 32, "fc": 64}
    assert v.info["parameters_before"] == before
    reopened = ctx.torch_session(v).module
    after = sum(p.numel() for p in reopened.parameters())
    assert after == v.info["parameters"] < before // 2
    assert reopened.features[0].out_channels == 16 and reopened.classifier[3].out_features == 10  # output kept
    assert v.info["layers"]["features.2"] == [64, 32]
    assert "L2" in v.info["importance"] and v.info["finetune"]["steps"] > 0
    assert sum(p.numel() for p in ctx.module().parameters()) == before  # the baseline was not touched
    onnx_v, = api.carry_on(ctx, v)
    assert onnx_v.parent == v.name and onnx_v.info["parity"]["ok"]
    assert onnx_v.info["parity"]["second_shape"]["shape"]["x"][0] != onnx_v.info["parity"]["example"]["shape"]["x"][0]
    assert onnx_v.size_bytes() < api.export(ctx).size_bytes()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_hidden_units_removed_and_export_parity(ctxs, cell):
    ctx = ctxs(cell)
    v = api.prune(ctx, 0.5, "structured", importance="l1", finetune_steps=8)
    m = ctx.torch_session(v).module
    assert m.rnn.hidden_size == 32 and v.info["arch"]["hidden"] == 32
    assert v.info["parameters"] == sum(p.numel() for p in m.parameters()) < v.info["parameters_before"]
    assert "L1" in v.info["importance"]
    api.export(ctx)  # a second RNN export in one process must stay dynamic in seq (torch 2.13 dispatch cache)
    onnx_v, = api.carry_on(ctx, v)
    assert onnx_v.info["parity"]["ok"]


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_rnn_pruner_keeps_the_right_gate_rows(cls):
    """Units whose every weight is zero contribute nothing; removing exactly them leaves the output unchanged,
    which fails if any gate block of weight_ih/weight_hh/biases is indexed wrongly."""
    from deepship.models.rnn import RNNForecaster

    torch.manual_seed(0)
    m = RNNForecaster("lstm" if cls is nn.LSTM else "gru", hidden=8).eval()
    dead = [1, 4, 6, 7]
    g = 4 if cls is nn.LSTM else 3
    with torch.no_grad():
        for j in dead:
            for k in range(g):
                for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
                    getattr(m.rnn, name)[k * 8 + j] = 0.0
            m.rnn.weight_hh_l0[:, j] = 0.0
            m.head.weight[:, j] = 0.0
    x = torch.rand(3, 11, 1) * 100
    ref = m(x)
    P.structured_prune(m, (torch.rand(2, 5, 1),), 0.5, "l2")
    assert m.rnn.hidden_size == 4
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-4)


def _masked_like(original, pruned):
    """``original`` with every attention head and MLP unit that ``pruned`` lacks switched off: the
    head's value rows zeroed (its output is then 0) and the unit's pre-activation pushed to -1e4
    (GELU gives 0)."""
    import copy

    ref = copy.deepcopy(original).float().eval()
    with torch.no_grad():
        for b0, b1, br in zip(original.blocks, pruned.blocks, ref.blocks):
            c0, c1 = b0.attn.qkv.out_features // 3, b1.attn.qkv.out_features // 3
            v0, v1 = b0.attn.qkv.weight[2 * c0:], b1.attn.qkv.weight[2 * c1:]
            gone = [i for i in range(c0) if not any(torch.equal(v0[i], v1[j]) for j in range(c1))]
            br.attn.qkv.weight[[2 * c0 + i for i in gone]] = 0
            br.attn.qkv.bias[[2 * c0 + i for i in gone]] = 0
            f0, f1 = b0.fc.weight, b1.fc.weight
            gone = [i for i in range(len(f0)) if not any(torch.equal(f0[i], f1[j]) for j in range(len(f1)))]
            br.fc.weight[gone] = 0
            br.fc.bias[gone] = -1e4
    return ref


def test_gpt_heads_and_mlp_width_pruned_then_exported_with_the_kv_cache(ctxs):
    """torch-pruning removes whole heads and MLP units of the GPT: the pruned model computes exactly what
    the original computes with those heads and units switched off; the stage's variant reopens with
    fewer heads in its KV cache, exports to the prefill + decode graphs (parity over 32 steps) and
    INT4, and every form gives the same held-out perplexity."""
    import copy

    from deepship.models import gpt
    from deepship.pipeline.arch import gpt as AG

    ctx = ctxs("gpt")
    m0 = ctx.module()
    m, info = P.structured_prune(copy.deepcopy(m0).float().eval(), P.example_args(ctx), 0.5)
    assert AG.pruned_arch(m) == {"n_head": 2, "head_size": 32, "d_mlp": 256} and m.cfg.n_head == 2
    assert info["parameters"] < 0.6 * info["parameters_before"]
    assert m.blocks[0].ln1.normalized_shape == (128,) and m.tok_emb.weight.shape == (1024, 128)  # residual kept
    x = torch.from_numpy(gpt.corpus()[1][:96][None])
    with torch.no_grad():
        assert (m(x)[0] - _masked_like(m0, m)(x)[0]).abs().max() < 1e-4

    v = api.prune(ctx, 0.5, finetune_steps=4)
    assert v.info["arch"]["n_head"] == 2 and v.info["finetune"]["steps"] == 4
    onnx_v, int4 = api.carry_on(ctx, v, ["int4-weight-only"])
    assert onnx_v.method == "onnx-kv" and onnx_v.info["parity"]["ok"] and onnx_v.info["parity_steps"]
    assert AG.variant_config(ctx, int4).n_head == 2
    ids = gpt.corpus()[1][:1500]
    ppl = {w.name: gpt.perplexity(ctx.session(w), gpt.TARGET, ids=ids) for w in (v, onnx_v, int4)}
    assert abs(ppl[onnx_v.name] - ppl[v.name]) < 1e-3 * ppl[v.name]
    assert abs(ppl[int4.name] - ppl[v.name]) < 0.1 * ppl[v.name]
    assert ppl[v.name] < gpt.bigram_baseline()["value"]
    from deepship.runtimes.generate import generate

    runner = AG.variant_runner(ctx, int4)
    assert runner.layout.n_head == 2 and generate(runner, ids[None, :16], 8).tokens.shape[1] >= 1


def test_user_model_pruned_is_saved_as_pt2_and_exports():
    ctx = api.load("test_prune_distill:small_mlp", inputs=["x:float32[batch,8]"])
    v = api.prune(ctx, 0.5, "structured")
    assert v.files == ["model.pt2"] and v.info["finetune"].get("skipped")
    assert v.info["parameters"] < v.info["parameters_before"]
    onnx_v, = api.carry_on(ctx, v)
    assert onnx_v.info["parity"]["ok"]


# ---- unstructured pruning --------------------------------------------------------------------------

def test_unstructured_zeroes_weights_only(ctxs):
    from safetensors import safe_open

    ctx = ctxs("mlp")
    v = api.prune(ctx, 0.5, "unstructured", finetune_steps=22)
    assert v.info["parameters"] == v.info["parameters_before"]  # dense: nothing removed
    assert 0.45 < v.info["achieved_sparsity"] < 0.5  # biases are not pruned
    assert v.info["gzip_bytes"] < v.info["parent_gzip_bytes"]
    assert "only the compressed" in v.info["note"]
    with safe_open(str(v.path), framework="pt") as f:  # prune.remove ran: no weight_orig / weight_mask
        assert not [k for k in f.keys() if k.endswith(("_orig", "_mask"))]
    m = ctx.torch_session(v).module
    w = m.net[0].weight
    assert float((w == 0).float().mean()) > 0.2


# ---- distillation ----------------------------------------------------------------------------------

def test_hinton_loss_matches_hand_computed_value():
    s, t, y, tau, alpha = [2.0, 0.0], [0.0, 1.0], 0, 2.0, 0.3
    ce = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))  # 0.126928
    ps = [math.exp(1.0) / (math.exp(1.0) + 1.0), 1.0 / (math.exp(1.0) + 1.0)]  # softmax(s / tau)
    pt = [1.0 / (1.0 + math.exp(0.5)), math.exp(0.5) / (1.0 + math.exp(0.5))]  # softmax(t / tau)
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))  # KL(teacher || student)
    expected = alpha * ce + (1 - alpha) * tau ** 2 * kl
    got = L.hinton_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), tau, alpha)
    assert abs(float(got) - expected) < 1e-5
    # by hand: CE = ln(1 + e^-2) = 0.126928; KL = 0.377541 ln(0.377541/0.731059) + 0.622459 ln(0.622459/0.268941)
    # = 0.272867; loss = 0.3 * 0.126928 + 0.7 * 4 * 0.272867 = 0.80212
    assert abs(expected - 0.80212) < 1e-4
    # alpha = 1 is plain cross-entropy (the student trained without the teacher)
    assert abs(float(L.hinton_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), tau, 1.0)) - ce) < 1e-6


def test_token_kd_masks_padding_and_regression_loss():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    y = torch.tensor([[1, 2, -100], [0, -100, -100]])
    keep = y.reshape(-1) != -100
    want = L.hinton_loss(s.reshape(-1, 5)[keep], t.reshape(-1, 5)[keep], y.reshape(-1)[keep], 3.0, 0.2)
    assert torch.allclose(L.token_kd_loss(s, t, y, 3.0, 0.2), want)
    so, to, yo = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [2.0]]), torch.tensor([[0.0], [4.0]])
    # 0.25 * mean((s-y)^2)/4 + 0.75 * mean((s-t)^2)/4 = 0.25 * 1/4 + 0.75 * 1/4
    assert abs(float(L.regression_kd_loss(so, to, yo, 0.25, scale=2.0)) - 0.25) < 1e-6


def test_parse_student_specs(ctxs):
    mlp = ctxs("mlp").module()
    arch = {"hidden": [128, 64]}
    assert D.parse_student("auto", mlp, arch) == {"arch": {"hidden": [64, 32]}}
    assert D.parse_student("0.25", mlp, arch) == {"arch": {"hidden": [32, 16]}}
    assert D.parse_student("width=0.5,layers=1", mlp, arch) == {"arch": {"hidden": [64]}}
    assert D.parse_student("hidden=48x24", mlp, arch) == {"arch": {"hidden": [48, 24]}}
    assert D.parse_student('{"hidden": [20]}', mlp, arch) == {"arch": {"hidden": [20]}}
    cnn = ctxs("cnn").module()
    assert D.parse_student("c1=8,c2=16", cnn, {"c1": 32, "c2": 64, "fc": 128}) == {"arch": {"c1": 8, "c2": 16, "fc": 128}}
    with pytest.raises(StageError, match="unknown student key.*c1, c2, fc"):
        D.parse_student("channels=8", cnn, {"c1": 32, "c2": 64, "fc": 128})
    with pytest.raises(StageError, match="fixed depth"):
        D.parse_student("width=0.5,layers=1", cnn, {"c1": 32, "c2": 64, "fc": 128})


def test_distilled_student_is_smaller_reopens_and_exports(ctxs):
    ctx = ctxs("mlp")
    v = api.distill(ctx, "hidden=32x16", temperature=4.0, alpha=0.1, epochs=3)
    ctrl = api.distill(ctx, "hidden=32x16", temperature=4.0, alpha=1.0, epochs=3)
    assert v.name == "distilled-hidden_32x16" and ctrl.name == "student-hidden_32x16-scratch"
    assert v.key != ctrl.key and v.info["with_teacher"] and not ctrl.info["with_teacher"]
    assert v.info["arch"] == {"hidden": [32, 16]} and v.info["param_ratio"] < 0.5
    m = ctx.torch_session(v).module
    assert sum(p.numel() for p in m.parameters()) == v.info["parameters"] < v.info["teacher_parameters"]
    onnx_v, q = api.carry_on(ctx, v, ["int8-dynamic"])
    assert onnx_v.info["parity"]["ok"] and q.parent == onnx_v.name


def test_regression_student_distills(ctxs):
    ctx = ctxs("lstm")
    v = api.distill(ctx, "0.25", alpha=0.5, epochs=2)
    assert v.info["arch"]["hidden"] == 16 and "mse" in v.info["loss_name"]
    assert ctx.torch_session(v).module.rnn.hidden_size == 16


# ---- errors, the sweep, the report plan -----------------------------------------------------------

def test_cli_says_why_an_architecture_cannot_be_pruned(run_cli, tmp_path):
    code, out, err = run_cli("prune", "test_prune_distill:stacked_lstm", "--input", "x:float32[batch,seq,1]",
                             "-o", tmp_path / "p")
    assert code == 2 and "num_layers=2" in err and "--unstructured" in err and "Traceback" not in err
    code, out, err = run_cli("prune", "test_prune_distill:linear_only", "--input", "x:float32[batch,6]",
                             "--finetune-steps", "0", "-o", tmp_path / "q")
    assert code == 2 and "produces a model output" in err
    code, out, err = run_cli("prune", "cnn", "--sparsity", "1.5", "-o", tmp_path / "r")
    assert code == 2 and "outside (0, 1)" in err
    assert not (tmp_path / "r" / "sweep.json").exists()


def test_api_rejects_onnx_parent_and_bad_args(ctxs):
    ctx = ctxs("cnn")
    with pytest.raises(StageError, match="prune the torch model"):
        P.prunable(ctx, "structured", api.export(ctx))
    with pytest.raises(StageError, match="unknown prune method"):
        api.prune(ctx, 0.5, "random")
    with pytest.raises(StageError, match="unknown importance"):
        P.structured_prune(ctx.fresh_module(), (torch.rand(2, 1, 8, 8),), 0.5, "taylor")

    class Attention(nn.Module):  # custom multi-head attention (as in a GPT block): heads must be registered
        def __init__(self):
            super().__init__()
            self.n_head, self.qkv, self.proj = 2, nn.Linear(8, 24), nn.Linear(8, 8)

    assert "attention heads" in P.why_not_structured(nn.Sequential(Attention(), nn.Linear(8, 2)))


def test_sweep_gives_one_row_per_sparsity(run_cli, tmp_path):
    code, out, err = run_cli("prune", "mlp", "--sparsity", "0.25,0.75", "--finetune-steps", "0", "--batches", "2",
                             "--min-time", "0.01", "-o", tmp_path / "sw")
    assert code == 0, err
    rep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["sparsity"] for r in rep["rows"]] == [0.0, 0.25, 0.75]
    params = [r["parameters"] for r in rep["rows"]]
    assert params[0] > params[1] > params[2]
    assert all(set(r["metric"]) == {"torch", "onnx"} and "2" in r["latency_ms"]["onnx"] for r in rep["rows"])
    md = (tmp_path / "sw" / "sweep.md").read_text()
    assert md.count("\n| 0.") == 3
    assert (tmp_path / "sw" / "pruned-structured-75-onnx.onnx").is_file()
    assert json.loads((tmp_path / "sw" / "pruned-structured-25" / "variant.json").read_text())["info"]["arch"]


def test_zoo_plan_adds_chains_with_parents_first():
    from deepship.models import resolve
    from deepship.pipeline.adapters import adapter_for
    from deepship.pipeline.report import plan_for

    def zoo_plan(name, default):
        spec = resolve(name)
        return adapter_for(spec).plan_for(spec, default)

    plan = zoo_plan("cnn", plan_for())
    names = [e[0] for e in plan]
    for name, stage, method, params, parent in plan:
        assert parent in ["fp32-torch"] + names[:names.index(name)]
    assert {"pruned-structured-25", "pruned-structured-50", "pruned-structured-75", "pruned-structured-50-int8-static",
            "pruned-unstructured-50", "distilled-w50", "distilled-w50-int8-static"} <= set(names)
    assert "student-w50-scratch" in [e[0] for e in zoo_plan("mlp", plan_for())]
    only_dyn = zoo_plan("cnn", plan_for(["int8-dynamic"]))
    assert not [e for e in only_dyn if e[2] == "int8-static"]
    assert zoo_plan("gru", []) == [e for e in zoo_plan("gru", []) if e[1] == "prune"]


def test_report_notes_for_prune_rows(ctxs):
    ctx = ctxs("mlp")
    v = api.prune(ctx, 0.5, "unstructured", finetune_steps=22)
    notes = P.report_notes(ctx, v)
    assert "dense size/latency unchanged" in notes["zeroed"] and "parent" in notes["gzip"]
    s = api.prune(ctx, 0.5, "structured", finetune_steps=22)
    assert P.report_notes(ctx, s)["params"].endswith(f"{s.info['parameters']:,}")
    assert np.isfinite(P.report_notes(ctx, s)["metric before fine-tune"])
