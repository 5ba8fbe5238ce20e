"""Export parity at a second shape for every zoo model, and every quantized variant measured on real held-out
data against a stated budget."""
import numpy as np
import onnx
import pytest

from deepship import api
from deepship.errors import ExportError
from deepship.models.spec import SECOND_DIM_SIZES, ModelSpec, TensorSpec
from deepship.models.zoo import DEFAULT_SET
from deepship.pipeline.evaluate import evaluate

# Budgets: worst allowed change of the metric against the FP32 torch model, in the metric's own units.
# accuracy: fraction (0.01 = 1 point); mae: relative (0.10 = 10% worse).
BUDGETS = {
    "accuracy": {"int8-dynamic": 0.01, "int8-static": 0.01, "fp16": 0.005, "bf16": 0.01, "int4-weight-only": 0.02},
    "mae": {"int8-dynamic": 0.10, "int8-static": 0.10, "fp16": 0.02, "bf16": 0.05, "int4-weight-only": 0.10},
}


@pytest.mark.parametrize("name", DEFAULT_SET)
def test_export_parity_at_second_shape(zoo_ctx, name):
    ctx = zoo_ctx(name)
    v = api.export(ctx)
    p = v.info["parity"]
    assert p["ok"]
    assert p["second_shape"]["shape"] != p["example"]["shape"]
    assert p["second_shape"]["shape"]["x"][0] == SECOND_DIM_SIZES["batch"]
    m = onnx.load(str(v.path))
    assert m.opset_import[0].version == v.info["opset"] == 18
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    if name in ("lstm", "gru"):
        assert dims[1].dim_param == "seq"
    # ONNX Runtime accepts a third, unseen shape too
    sess = ctx.session(v)
    sizes = {"batch": 5, "seq": 31}
    out = sess.run(ctx.spec.example_inputs(sizes))
    assert next(iter(out.values())).shape[0] == 5


def _metric(ctx, v):
    return evaluate(ctx, ctx.session(v), None)["metric"]


@pytest.mark.parametrize("name", DEFAULT_SET)
@pytest.mark.parametrize("method", ["int8-dynamic", "int8-static", "fp16", "bf16", "int4-weight-only"])
def test_quantized_variant_within_budget_on_held_out_data(zoo_ctx, name, method):
    ctx = zoo_ctx(name)
    base = _metric(ctx, ctx.baseline())
    v = api.quantize(ctx, method)
    got = _metric(ctx, v)
    metric = ctx.spec.metric
    budget = BUDGETS[metric.name][method]
    if metric.higher_is_better:
        assert base - got <= budget, f"{name} {method}: {metric.name} {base:.4f} -> {got:.4f}"
    else:
        assert (got - base) / base <= budget, f"{name} {method}: {metric.name} {base:.3f} -> {got:.3f}"
    # the stage says which nodes it quantized, and at least one was
    assert sum(v.info["nodes"]["quantized"].values()) >= 1
    parent = ctx.get(v.parent)
    if method != "int8-static" or name in ("mlp", "cnn"):
        assert v.size_bytes() < parent.size_bytes()


def test_lstm_dynamic_quantization_reaches_the_lstm(zoo_ctx):
    """quant_pre_process makes quantize_dynamic take the LSTM of a dynamo export (field notes)."""
    v = api.quantize(zoo_ctx("lstm"), "int8-dynamic")
    assert v.info["nodes"]["quantized"].get("LSTM") == 1


def test_entropy_and_percentile_calibration_use_real_histograms(zoo_ctx):
    ctx = zoo_ctx("cnn")
    mm = api.quantize(ctx, "int8-static", calibration="minmax")
    en = api.quantize(ctx, "int8-static", calibration="entropy")
    pc = api.quantize(ctx, "int8-static", calibration="percentile")
    assert en.info["num_bins"] == 2048 and en.info["calibration"] == "entropy"

    def scales(v):
        m = onnx.load(str(v.path))
        return {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith("_scale")}

    smm, sen, spc = scales(mm), scales(en), scales(pc)
    common = [k for k in smm if k in sen and k in spc and smm[k].size == 1]
    # histogram methods clip outliers: some activation scale differs from MinMax's
    assert any(not np.allclose(smm[k], sen[k]) for k in common)
    assert any(not np.allclose(smm[k], spc[k]) for k in common)
    for v in (en, pc):
        assert _metric(ctx, v) >= _metric(ctx, ctx.baseline()) - 0.02


def test_int4_block_size_and_gemm_rewrite(zoo_ctx):
    ctx = zoo_ctx("mlp")
    v = api.quantize(ctx, "int4-weight-only", block_size=128)
    assert v.info["block_size"] == 128 and v.info["gemm_rewritten"] == 3
    ops = {n.op_type for n in onnx.load(str(v.path)).graph.node}
    assert "MatMulNBits" in ops and "Gemm" not in ops


def test_ort_engine_matches_onnx_and_records_provider(zoo_ctx):
    ctx = zoo_ctx("cnn")
    e = api.engine(ctx, "onnxruntime")
    s = ctx.session(e)
    assert s.provider == "CPUExecutionProvider" == e.info["providers"][0]
    feeds = ctx.spec.example_inputs({"batch": 4})
    a = s.run(feeds)["logits"]
    b = ctx.session(ctx.get("fp32-onnx")).run(feeds)["logits"]
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


class _PyLoop(__import__("torch").nn.Module):
    def __init__(self):
        import torch

        super().__init__()
        self.l = torch.nn.Linear(1, 4)

    def forward(self, x):
        import torch

        h = torch.zeros(x.shape[0], 4)
        for t in range(x.shape[1]):
            h = h + self.l(x[:, t])
        return h


def test_export_detects_dim_fixed_by_python_loop(tmp_path):
    from deepship.exporters import export_onnx

    spec = ModelSpec("loop", "other", None, [TensorSpec("x", ("batch", "seq", 1))])
    with pytest.raises(ExportError, match="fixed dim 'seq'"):
        export_onnx(_PyLoop(), spec, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_failure_names_the_operator(tmp_path):
    import torch

    from deepship.exporters import export_onnx

    class Eig(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.matrix_exp(x)

    spec = ModelSpec("eig", "other", None, [TensorSpec("x", ("batch", 4, 4))])
    with pytest.raises(ExportError, match="operator aten.linalg_matrix_exp"):
        export_onnx(Eig(), spec, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
