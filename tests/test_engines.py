"""Engine backends: AOTInductor, ONNX Runtime execution providers, TensorRT.

Stated output tolerances against the FP32 torch model, on the held-out digits split:

| engine precision | bound on max abs error | top-1 agreement |
|---|---|---|
| fp32 (inductor, onnxruntime) | 1e-4 + 1e-3 x max abs reference | 100% |
| bf16 (inductor) | 0.05 x max abs reference | >= 98% |
| int8 (inductor PT2E, per-channel, oneDNN or reference lowering) | 0.05 x max abs reference | >= 97% |
| int8 (onnxruntime on the static QDQ model, MinMax, UInt8 activations) | 0.25 x max abs reference | >= 97% |

One small model (the MLP) is compiled with AOTInductor; packages are cached through
``ModelContext.build`` so each precision compiles once per test session. GPU tests skip with a reason.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepship import api
from deepship.errors import ArtifactError, InputSpecError, StageError
from deepship.pipeline.evaluate import drift

TOLERANCE = {"fp32": (1e-4, 1e-3, 1.0), "bf16": (0.0, 0.05, 0.98), "int8": (0.0, 0.05, 0.97),
             "int8-ort-qdq": (0.0, 0.25, 0.97)}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _trt():
    from deepship.runtimes.engines.tensorrt import import_tensorrt

    return import_tensorrt()


NO_GPU = "needs an NVIDIA GPU with CUDA (none on this machine)"
needs_gpu = pytest.mark.skipif(not _has_cuda(), reason=NO_GPU)
needs_trt = pytest.mark.skipif(_trt()[0] is None, reason="TensorRT not installed (pip install 'deepship[tensorrt-rtx]')")


def _check(out: np.ndarray, ref: np.ndarray, precision: str) -> None:
    atol, rtol, agree = TOLERANCE[precision]
    d = drift(out, ref)
    assert d["max_abs"] <= atol + rtol * float(np.abs(ref).max()), (precision, d)
    assert d.get("top1_agreement", 1.0) >= agree, (precision, d)


@pytest.fixture(scope="module")
def mlp(zoo_ctx):
    ctx = zoo_ctx("mlp")
    feeds = ctx.dataset().test.inputs
    ref = ctx.session(ctx.baseline()).run_batched(feeds)["logits"]
    return ctx, feeds, ref


# ---- AOTInductor ---------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_inductor_matches_fp32_torch(mlp, precision):
    ctx, feeds, ref = mlp
    v = api.engine(ctx, "inductor", precision)
    assert v.format == "engine:inductor" and v.precision == precision
    assert (Path(v.dir) / "model.pt2").is_file()
    meta = json.loads((Path(v.dir) / "engine.json").read_text())
    assert "batch" in meta["dynamic_dims"] and meta["precision"] == precision
    sess = ctx.session(v)
    assert sess.runtime == "inductor" and sess.provider == "cpu"
    # the batch dim stays dynamic: batch 1, an odd batch, and the evaluation batches of 256
    for b in (1, 7):
        one = sess.run({"x": feeds["x"][:b]})["logits"]
        assert one.shape == (b, 10)
    _check(sess.run_batched(feeds)["logits"], ref, precision)
    if precision == "int8":
        assert v.info["int8"]["quantize_nodes"] > 0
        assert v.info["int8"]["library"] == "torchao.quantization.pt2e"


def test_inductor_package_runs_without_model_code(mlp, tmp_path):
    """The .pt2 loads in a fresh interpreter that imports only torch (no deepship, no model class)."""
    ctx, feeds, ref = mlp
    v = api.engine(ctx, "inductor", "fp32")
    np.save(tmp_path / "x.npy", feeds["x"][:5])
    code = ("import sys, numpy as np, torch\n"
            "assert 'deepship' not in sys.modules\n"
            f"r = torch._inductor.aoti_load_package({str(Path(v.dir) / 'model.pt2')!r})\n"
            f"y = r(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})))\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, y.numpy())\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, capture_output=True, timeout=120)
    _check(np.load(tmp_path / "y.npy"), ref[:5], "fp32")


def test_inductor_rejects_unknown_precision(mlp):
    with pytest.raises(StageError, match="builds fp32"):
        api.engine(mlp[0], "inductor", "int4")


@needs_gpu
def test_inductor_cuda_matches_fp32_torch(mlp):
    ctx, feeds, ref = mlp
    v = api.engine(ctx, "inductor", "fp32", device="cuda")
    _check(ctx.session(v).run_batched(feeds)["logits"], ref, "fp32")


# ---- ONNX Runtime execution providers -------------------------------------------------------------

def test_ort_engine_records_the_provider_that_ran(mlp):
    import onnxruntime as ort

    ctx, feeds, ref = mlp
    v = api.engine(ctx, "onnxruntime", "fp32", providers="cuda,cpu")
    rec = v.info["provider_record"]
    assert rec["requested"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert rec["node_placement"] and rec["ran"] == max(rec["node_placement"], key=rec["node_placement"].get)
    assert rec["fell_back"] == (rec["ran"] != "CUDAExecutionProvider")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert rec["ran"] == "CPUExecutionProvider" and rec["fell_back"]
    sess = ctx.session(v)
    assert sess.provider == sess.provider_record["ran"]
    assert sess.provider in sess.sess.get_providers()
    _check(sess.run_batched(feeds)["logits"], ref, "fp32")


def test_ort_strict_refuses_to_fall_back(mlp):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA EP: nothing falls back")
    with pytest.raises(StageError, match="onnxruntime-gpu"):
        api.engine(mlp[0], "onnxruntime", "fp32", providers="cuda", strict=True)


def test_provider_names_resolve():
    from deepship.runtimes.engines.providers import resolve_providers

    assert resolve_providers("tensorrt,cuda") == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                  "CPUExecutionProvider"]
    assert resolve_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(StageError, match="unknown execution provider 'gpu0'"):
        resolve_providers("gpu0")


def test_ort_int8_engine_builds_from_the_qdq_model(mlp):
    ctx, feeds, ref = mlp
    v = api.engine(ctx, "onnxruntime", "int8")
    assert v.parent == "int8-static" and v.precision == "int8"
    _check(ctx.session(v).run_batched(feeds)["logits"], ref, "int8-ort-qdq")


# ---- OpenVINO -------------------------------------------------------------------------------------

needs_openvino = pytest.mark.skipif(not __import__("deepship.runtimes.engines", fromlist=["get_backend"])
                                    .get_backend("openvino").available()[0],
                                    reason="openvino/nncf missing (pip install -e '.[openvino]'; make install does it)")


@needs_openvino
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_openvino_engine_matches_fp32_torch(mlp, precision):
    ctx, feeds, ref = mlp
    v = api.engine(ctx, "openvino", precision)
    assert v.parent == "fp32-onnx" and v.precision == precision and v.format == "engine:openvino"
    assert v.info["inference_precision"] == "f32" and v.info["hint"] == "LATENCY" and v.info["streams"] >= 1
    if precision == "int8":
        assert v.info["calibration_samples"] > 0 and "nncf" in v.info["quantizer"] and v.info["calibration_data"]
    sess = ctx.session(v)
    assert sess.provider == "openvino:CPU"
    got = sess.run_batched(feeds)["logits"]
    if precision == "fp32":
        assert np.abs(got - ref).max() < 1e-4
    else:
        _check(got, ref, "int8-ort-qdq")  # the same INT8 tolerance


@needs_openvino
def test_openvino_bf16_records_the_precision_that_ran(mlp):
    """BF16 runs in BF16 only where the CPU has it (AMX / AVX-512 BF16); the row says which ran."""
    ctx, feeds, ref = mlp
    v = api.engine(ctx, "openvino", "bf16")
    assert v.precision == "bf16" and v.info["inference_precision"] in ("bf16", "f32")
    got = ctx.session(v).run_batched(feeds)["logits"]
    err = float(abs(got - ref).max() / abs(ref).max())
    assert err < (2e-2 if v.info["inference_precision"] == "bf16" else 1e-5)
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.97


@needs_openvino
def test_openvino_bad_options_are_one_line(mlp, cli):
    ctx, _, _ = mlp
    with pytest.raises(StageError, match="builds fp32, bf16, int8"):
        api.engine(ctx, "openvino", "fp16")
    with pytest.raises(StageError, match="performance hint"):
        api.engine(ctx, "openvino", "fp32", hint="fastest")
    with pytest.raises(StageError, match="inference_precision bf16 is not valid for an openvino fp32"):
        api.engine(ctx, "openvino", "fp32", inference_precision="bf16")
    code, _, err = cli("engine", "mlp", "--backend", "openvino", "--precision", "int8", "--ignored", "no_such_node",
                       "--no-measure", "-o", "/tmp/deepship-ov-test-never-written")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nncf.quantize failed" in err
    assert not Path("/tmp/deepship-ov-test-never-written").exists()


# ---- TensorRT -------------------------------------------------------------------------------------

def test_tensorrt_missing_prints_one_line(cli, monkeypatch):
    import deepship.runtimes.engines.tensorrt as T

    monkeypatch.setattr(T, "import_tensorrt", lambda: (None, ""))
    code, out, err = cli("engine", "mlp", "--backend", "tensorrt")
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and "pip install" in lines[0]


def test_parse_shapes():
    from deepship.runtimes.engines.tensorrt import parse_shapes

    assert parse_shapes("1/8/64") == {"batch": (1, 8, 64)}
    assert parse_shapes("batch=1/32/256,seq=4/24/96") == {"batch": (1, 32, 256), "seq": (4, 24, 96)}
    for bad in ("1/8", "batch=8/4/64", "0/1/2", "b-atch=1/2/3"):
        with pytest.raises(InputSpecError):
            parse_shapes(bad)


@needs_trt
def test_tensorrt_builds_and_serializes_engines(zoo_ctx):
    """Parse, build and serialize real engines for the CNN (FP32 with a custom profile, INT8 QDQ)."""
    trt, flavour = _trt()
    ctx = zoo_ctx("cnn")
    v = api.engine(ctx, "tensorrt", "fp32", shapes={"batch": (1, 8, 64)})
    meta = json.loads((Path(v.dir) / "engine.json").read_text())
    assert (Path(v.dir) / "model.engine").stat().st_size == meta["engine_bytes"] > 0
    assert meta["tensorrt"] == trt.__version__ and meta["library"] == flavour and meta["precision"] == "fp32"
    assert meta["profiles"]["x"] == {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [64, 1, 8, 8]}
    assert meta["inputs"][0]["name"] == "x" and meta["outputs"][0]["name"] == "logits"
    q = api.engine(ctx, "tensorrt", "int8")
    assert q.precision == "int8" and q.info["int8_source"] == "qdq"
    assert (Path(q.dir) / "model.engine").stat().st_size > 0


@needs_trt
def test_tensorrt_parser_errors_name_the_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from deepship.runtimes.engines.tensorrt import build_engine

    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery_node", domain="example.custom")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("example.custom", 1)])
    onnx.save_model(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(StageError, match="mystery_node"):
        build_engine(tmp_path / "bad.onnx", tmp_path)
    assert not (tmp_path / "model.engine").exists()


@pytest.mark.skipif(_has_cuda(), reason="checks the no-GPU path")
def test_tensorrt_session_refuses_without_gpu_before_creating_a_runtime(monkeypatch, tmp_path):
    import deepship.runtimes.engines.tensorrt as T

    class _Boom:
        def Runtime(self, *a):  # noqa: N802
            raise AssertionError("a TensorRT Runtime was created on a machine without a GPU")

    monkeypatch.setattr(T, "import_tensorrt", lambda: (_Boom(), "tensorrt"))
    with pytest.raises(ArtifactError, match="needs an NVIDIA GPU"):
        T.TensorRTSession(tmp_path / "model.engine", {"library": "tensorrt", "tensorrt": "10"})


@needs_trt
@needs_gpu
def test_tensorrt_engine_runs_and_matches_fp32_torch(zoo_ctx):
    ctx = zoo_ctx("cnn")
    feeds = ctx.dataset().test.inputs
    ref = ctx.session(ctx.baseline()).run_batched(feeds)["logits"]
    v = api.engine(ctx, "tensorrt", "fp32")
    _check(ctx.session(v).run_batched(feeds, batch_size=64)["logits"], ref, "fp32")


@needs_trt
def test_tensorrt_timing_cache_is_reused(zoo_ctx):
    trt, flavour = _trt()
    if flavour == "tensorrt_rtx":
        pytest.skip("TensorRT-RTX timing-cache calls are no-ops (it tunes at run time)")
    ctx = zoo_ctx("mlp")
    api.engine(ctx, "tensorrt", "fp32", shapes={"batch": (1, 4, 16)})
    v = api.engine(ctx, "tensorrt", "fp32", shapes={"batch": (1, 5, 16)})
    assert v.info["timing_cache"]["reused"]


@needs_openvino
def test_report_engine_rows_take_a_precision(mlp):
    from deepship.pipeline.report import extra_entries

    ctx, _, _ = mlp
    rows = extra_entries(ctx, ["openvino", "openvino:int8"])
    assert [(r[0], r[3]["precision"], r[4]) for r in rows] == [("openvino-engine", "fp32", "fp32-onnx"),
                                                             ("openvino-engine-int8", "int8", "fp32-onnx")]
    with pytest.raises(StageError, match="builds fp32, bf16, int8"):
        extra_entries(ctx, ["openvino:fp16"])
