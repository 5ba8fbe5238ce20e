"""Quantization methods (ONNX Runtime's quantization tools, and torch for BF16).

| method | library | consumes -> produces | what |
|---|---|---|---|
| ``int8-dynamic`` | ``onnxruntime.quantization.quantize_dynamic`` | onnx -> onnx | INT8 weights, activations quantized at run time; ``quant_pre_process`` first (needed for LSTM/GRU of a dynamo export) |
| ``int8-static`` | ``onnxruntime.quantization.quantize_static`` | onnx -> onnx | QDQ format, INT8 weights (per-channel) and activations, calibrated on real training samples with MinMax, Percentile or Entropy (real histogram bins through ``create_calibrator``) |
| ``fp16`` | ``onnxruntime.transformers.float16`` | onnx -> onnx | FP16 weights and compute, FP32 inputs/outputs kept; ops without FP16 CPU kernels stay FP32 |
| ``int4-weight-only`` | ``onnxruntime.quantization.matmul_nbits_quantizer`` | onnx -> onnx | MatMulNBits, 4-bit block-wise weights (RTN), ``accuracy_level`` 4; Gemm is rewritten to MatMul+Add first |
| ``bf16`` | torch | torch -> torch | weights and compute in bfloat16 (reaches AMX-BF16 tile units on CPUs that have them, where ONNX Runtime has no fast BF16 kernel) |
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import StageError
from ..exporters.onnx import save_onnx
from ..models.train import save_weights
from ..utils import first_line
from .context import CALIBRATION_SAMPLES, ModelContext
from .export import onnx_parent
from .stages import get_stage, register_stage
from .variants import Variant

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "ConvTranspose", "Attention")
# quantized op -> the original op it replaces
_Q_OPS = {"MatMulInteger": "MatMul", "ConvInteger": "Conv", "DynamicQuantizeLSTM": "LSTM",
          "DynamicQuantizeMatMul": "MatMul", "MatMulNBits": "MatMul", "QLinearConv": "Conv",
          "QLinearMatMul": "MatMul", "QGemm": "Gemm", "QAttention": "Attention"}
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


#: ops whose weights an ``exclude`` parameter and the per-layer search (optimize tune) keep in float
LAYER_OPS = ("MatMul", "Gemm", "Conv", "Attention")


def matching_nodes(model_proto, patterns: Sequence[str], op_types: Sequence[str] = LAYER_OPS) -> list[str]:
    """Names of ``op_types`` nodes whose name matches any regex in ``patterns`` (``re.search``): the
    nodes an ``exclude`` parameter keeps in float (``nodes_to_exclude`` of ONNX Runtime's quantizers)."""
    import re

    rx = [re.compile(p) for p in patterns]
    return [n.name for n in model_proto.graph.node if n.op_type in op_types and any(r.search(n.name) for r in rx)]


@dataclass
class Layer:
    """A quantizable node: ``name`` (the ONNX node name, also OpenVINO's friendly name), ``op``, and
    ``macs``: multiply-accumulates per sample estimated from static shapes (symbolic dims count 1)."""

    name: str
    op: str
    macs: float


def quantizable_layers(onnx_path: str | Path) -> list[Layer]:
    """The MatMul/Gemm/Conv nodes with a constant weight (and fused Attention nodes) of an ONNX model,
    with a cost estimate: output elements per sample times the reduction length.

    Raises:
        StageError: the file cannot be read as ONNX.
    """
    import onnx

    try:
        m = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise StageError(f"cannot read {onnx_path} as ONNX: {first_line(e, 160)}") from None
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:
        pass
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    shapes: dict[str, list[int]] = {}
    for vi in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    out = []
    for n in m.graph.node:
        if n.op_type not in LAYER_OPS or not n.name:
            continue
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        if w is None and n.op_type != "Attention":
            continue  # activation x activation MatMul: nothing to quantize statically
        y = shapes.get(n.output[0], [])
        per_sample = float(np.prod(y[1:])) if len(y) > 1 else 1.0
        if n.op_type == "Conv":
            red = float(np.prod(w[1:]))
        elif n.op_type == "Gemm" and w and any(a.name == "transB" and a.i for a in n.attribute):
            red = float(w[1])  # B is (N, K) under transB=1: the reduction runs over its second axis
        else:
            red = float(w[0]) if w else 1.0
        out.append(Layer(n.name, n.op_type, max(per_sample * red, 1.0)))
    return out


class CalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over real samples.

    Args:
        samples: ``{input name: array (N, ...)}``; fed ``batch_size`` samples at a time.
    """

    def __init__(self, samples: Mapping[str, np.ndarray], batch_size: int = 32):
        self.samples = {k: np.ascontiguousarray(v) for k, v in samples.items()}
        self.n = len(next(iter(self.samples.values())))
        self.bs = batch_size
        self.i = 0
        self.start, self.end = 0, self.n

    def get_next(self):
        lo = self.start + self.i * self.bs
        if lo >= self.end:
            return None
        self.i += 1
        return {k: v[lo:min(lo + self.bs, self.end)] for k, v in self.samples.items()}

    def rewind(self):
        self.i = 0

    def __len__(self):
        return self.n

    def set_range(self, start_index: int, end_index: int):
        self.start, self.end, self.i = start_index, end_index, 0


def _op_counts(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def quantized_nodes(fp32_model, q_model) -> dict[str, Any]:
    """Which compute nodes run in reduced precision after quantization.

    Returns:
        ``{"quantized": {op: count}, "kept_fp32": {op: count}}`` over the compute ops (Conv, Gemm,
        MatMul, LSTM, GRU, ...). QDQ: a node counts as quantized when an input comes from a
        DequantizeLinear; QOperator/dynamic/4-bit: by its replacement op (MatMulInteger, MatMulNBits, ...).
    """
    before = {k: v for k, v in _op_counts(fp32_model).items() if k in COMPUTE_OPS}
    produced_by = {o: n for n in q_model.graph.node for o in n.output}
    q: collections.Counter = collections.Counter()
    fp16_inits = {i.name for i in q_model.graph.initializer if i.data_type == 10}
    for n in q_model.graph.node:
        if n.op_type in _Q_OPS:
            q[_Q_OPS[n.op_type]] += 1
        elif n.op_type in COMPUTE_OPS:
            src = [produced_by.get(i) for i in n.input if i]
            if any(s is not None and s.op_type == "DequantizeLinear" for s in src):
                q[n.op_type] += 1
            elif any(i in fp16_inits for i in n.input) or any(s is not None and s.op_type == "Cast" and
                                                              any(a.name == "to" and a.i == 10 for a in s.attribute) for s in src):
                q[n.op_type] += 1
    # Gemm rewritten to MatMul for int4: attribute MatMul counts to Gemm where the original had Gemm
    if "Gemm" in before and "MatMul" in q and q["MatMul"] > before.get("MatMul", 0):
        extra = q["MatMul"] - before.get("MatMul", 0)
        q["MatMul"] -= extra
        q["Gemm"] += extra
        if q["MatMul"] == 0:
            del q["MatMul"]
    kept = {k: v - q.get(k, 0) for k, v in before.items() if v - q.get(k, 0) > 0}
    return {"quantized": dict(q), "kept_fp32": kept}


def _save(model, out: Path) -> None:
    save_onnx(model, out)


@contextlib.contextmanager
def _working_dir(d: Path):
    prev = os.getcwd()
    os.chdir(d)
    try:
        yield
    finally:
        os.chdir(prev)


def pre_process(src: Path, dst: Path) -> dict:
    """ONNX Runtime's ``quant_pre_process`` (symbolic shape inference + ONNX optimizer) of ``src``
    into ``dst``, run inside ``dst``'s folder (the library writes temporary files, e.g.
    ``sym_shape_infer_temp.onnx`` and external ``.data`` files, into the working directory).

    Where ORT's symbolic shape inference cannot finish (transformer graphs from Optimum stop with
    "Incomplete symbolic shape inference"), it is retried with ONNX's own shape inference only.

    Returns:
        ``{"symbolic_shape_inference": bool}`` plus ``"skipped_because"`` when it was skipped.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    with _working_dir(dst.parent):
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
            return {"symbolic_shape_inference": True}
        except Exception as e:  # ORT raises plain Exception for incomplete inference
            reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            return {"symbolic_shape_inference": False, "skipped_because": reason}


DYNAMIC_OPS = ("MatMul", "Gemm", "Conv", "LSTM", "Attention")


def int8_dynamic(src: Path, out: Path, per_channel: bool = False, exclude: Sequence[str] = (),
                 op_types: Sequence[str] = DYNAMIC_OPS) -> dict:
    """INT8 dynamic quantization (weights INT8, activations quantized per call); nodes whose name
    matches a regex of ``exclude`` stay FP32. ``op_types`` may add ``Gather`` (INT8 embedding tables,
    ONNX Runtime's ``GatherQuant``): after ``int4-weight-only`` that makes the INT4-MatMul / INT8-embedding
    mix a size search uses.

    Runs ``quant_pre_process`` (symbolic shape inference + ONNX optimizer) first, without which
    ``quantize_dynamic`` skips the LSTM/GRU of a dynamo export (weights built by Slice/Concat).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        prep = pre_process(src, pre)
        tmp = Path(td) / "q.onnx"
        excluded = matching_nodes(onnx.load(str(pre)), exclude) if exclude else []
        # dynamic mode rewrites each Gemm into a MatMul named "<gemm>_MatMul" (+ Add) before it looks at
        # nodes_to_exclude (onnxruntime.quantization.onnx_model.replace_gemm_with_matmul): name both
        quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=list(op_types),
                         nodes_to_exclude=excluded + [f"{n}_MatMul" for n in excluded], extra_options={"MatMulConstBOnly": True})
        qm = onnx.load(str(tmp))
        _save(qm, out)
    return {"nodes": quantized_nodes(onnx.load(str(src)), qm), "per_channel": per_channel, "pre_process": prep,
            "excluded_nodes": excluded, "library": "onnxruntime.quantization.quantize_dynamic"}


def int8_static(src: Path, out: Path, calibration: Mapping[str, np.ndarray], method: str = "minmax",
                per_channel: bool = True, percentile: float = 99.999, num_bins: int = 2048,
                symmetric_activations: bool = False, exclude: Sequence[str] = (), reduce_range: bool = False) -> dict:
    """INT8 static QDQ quantization calibrated on real samples.

    Args:
        calibration: ``{input: array (N, ...)}`` real training samples (not the held-out split).
        method: ``minmax``, ``percentile`` (``percentile`` of the |activation| histogram) or
            ``entropy`` (KL divergence, TensorRT-style; ``num_bins`` histogram bins really used).
        per_channel: per-output-channel weight scales for Conv/Gemm/MatMul.
        exclude: regexes of node names kept in FP32 (``nodes_to_exclude``; e.g. from a sensitivity table).
        reduce_range: 7-bit weights (ONNX Runtime's guard against u8s8 saturation on CPUs without VNNI).

    The calibrator is created with ``create_calibrator`` and ``extra_options={"num_bins": ...}``
    (``quantize_static`` alone drops ``num_bins``, making Entropy equal MinMax); its ranges are handed
    to ``quantize_static`` through ``calibration_cache_path``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    if method not in CALIBRATION_METHODS:
        raise StageError(f"unknown calibration method '{method}'; use one of {', '.join(CALIBRATION_METHODS)}")
    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    extra = {}
    if method == "percentile":
        extra = {"num_bins": num_bins, "percentile": percentile, "symmetric": symmetric_activations}
    elif method == "entropy":
        extra = {"num_bins": num_bins, "num_quantized_bins": 128, "symmetric": symmetric_activations}
    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        prep = pre_process(src, pre)
        cal = create_calibrator(pre, None, augmented_model_path=str(Path(td) / "aug.onnx"),
                                calibrate_method=cm, extra_options=extra)
        # ORT's histogram collector stacks per-batch arrays with np.asarray, which fails when an
        # intermediate tensor's shape differs between batches: feed histogram methods one batch.
        n = int(len(next(iter(calibration.values()))))
        with contextlib.redirect_stdout(io.StringIO()):
            cal.collect_data(CalibrationReader(calibration, batch_size=32 if method == "minmax" else n))
            ranges = cal.compute_data()
        del cal
        cache = Path(td) / "calib.json"
        save_tensors_data(ranges, cache)
        tmp = Path(td) / "q.onnx"
        excluded = matching_nodes(onnx.load(str(pre)), exclude) if exclude else []
        quantize_static(str(pre), str(tmp), None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        nodes_to_exclude=excluded, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8 if not symmetric_activations else QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=cm, calibration_cache_path=str(cache),
                        extra_options={"ActivationSymmetric": symmetric_activations})
        qm = onnx.load(str(tmp))
        _save(qm, out)
    return {"nodes": quantized_nodes(onnx.load(str(src)), qm), "calibration": method,
            "calibration_samples": int(len(next(iter(calibration.values())))), "per_channel": per_channel,
            "num_bins": num_bins if method != "minmax" else None, "format": "QDQ", "pre_process": prep,
            "excluded_nodes": excluded, "reduce_range": reduce_range,
            "library": "onnxruntime.quantization.quantize_static"}


FP16_CPU_BLOCK = ["LSTM", "GRU", "RNN", "Resize", "Upsample", "ReduceMean", "LayerNormalization"]


def fp16(src: Path, out: Path) -> dict:
    """FP16 weights and compute with FP32 inputs/outputs (``keep_io_types``).

    Recurrent ops (no FP16 CPU kernel in ONNX Runtime) and a few numerically sensitive ops stay FP32.
    """
    import onnx
    from onnxruntime.transformers import float16

    m = onnx.load(str(src))
    block = list(float16.DEFAULT_OP_BLOCK_LIST) + FP16_CPU_BLOCK
    qm = float16.convert_float_to_float16(m, keep_io_types=True, op_block_list=block)
    _save(qm, out)
    return {"nodes": quantized_nodes(onnx.load(str(src)), qm), "kept_ops": FP16_CPU_BLOCK,
            "library": "onnxruntime.transformers.float16"}


def gemm_to_matmul(model) -> int:
    """Rewrite ``Gemm(A, B, C)`` with constant B, ``alpha == beta == 1``, ``transA == 0`` into
    ``MatMul(A, B') + C`` in place (B' transposed if ``transB``), so MatMulNBits can take it.

    Returns the number of Gemm nodes rewritten.
    """
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    new_nodes = []
    count = 0
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type == "Gemm" and n.input[1] in inits and attrs.get("alpha", 1.0) == 1.0
                and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)):
            b = numpy_helper.to_array(inits[n.input[1]])
            if attrs.get("transB", 0):
                b = np.ascontiguousarray(b.T)
            bname = n.input[1] + "_matmul"
            model.graph.initializer.append(numpy_helper.from_array(b, bname))
            mm_out = n.output[0] + ("_mm" if len(n.input) > 2 and n.input[2] else "")
            new_nodes.append(helper.make_node("MatMul", [n.input[0], bname], [mm_out], name=(n.name or "gemm") + "_MatMul"))
            if len(n.input) > 2 and n.input[2]:
                new_nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=(n.name or "gemm") + "_Add"))
            count += 1
        else:
            new_nodes.append(n)
    if count:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        used = {i for n in model.graph.node for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        onnx.checker.check_model(model)
    return count


def int4_weight_only(src: Path, out: Path, block_size: int = 32, symmetric: bool = True,
                     accuracy_level: int = 4) -> dict:
    """4-bit block-wise weight-only quantization to ``MatMulNBits`` (RTN), activations stay FP32.

    ``accuracy_level=4`` lets ONNX Runtime compute with INT8 activations (faster on CPU).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size < 16 or block_size & (block_size - 1):
        raise StageError(f"INT4 block size {block_size} is not a power of two >= 16; use 32, 64 or 128")
    m = onnx.load(str(src))
    rewritten = gemm_to_matmul(m)
    q = MatMulNBitsQuantizer(m, bits=4, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level)
    q.process()
    qm = q.model.model
    _save(qm, out)
    info = quantized_nodes(onnx.load(str(src)), qm)
    return {"nodes": info, "block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level,
            "gemm_rewritten": rewritten, "library": "onnxruntime.quantization.matmul_nbits_quantizer"}


# ---- the quantize stages, and building a quantized variant ------------------------------------------

#: stage parameters a quantize method gets when none are given
QUANT_DEFAULT_PARAMS = {
    "int8-static": {"calibration": "minmax", "per_channel": True},
    "int4-weight-only": {"block_size": 32},
}


def _onnx_stage(fn_name: str):
    def run(ctx: ModelContext, parent: Variant, params: dict, out: Path):
        fn = globals()[fn_name]
        if fn_name == "int8_static":
            calib, desc = ctx.calibration(int(params.get("samples", CALIBRATION_SAMPLES)))
            info = int8_static(parent.path, out / "model.onnx", calib, method=params.get("calibration", "minmax"),
                               per_channel=bool(params.get("per_channel", True)),
                               exclude=tuple(params.get("exclude", ())), reduce_range=bool(params.get("reduce_range", False)))
            info["calibration_data"] = desc
        elif fn_name == "int4_weight_only":
            info = int4_weight_only(parent.path, out / "model.onnx", block_size=int(params.get("block_size", 32)))
        elif fn_name == "int8_dynamic":
            info = int8_dynamic(parent.path, out / "model.onnx", per_channel=bool(params.get("per_channel", False)),
                                exclude=tuple(params.get("exclude", ())),
                                op_types=tuple(params.get("op_types", DYNAMIC_OPS)))
        else:
            info = fn(parent.path, out / "model.onnx")
        files = ["model.onnx"] + (["model.onnx.data"] if (out / "model.onnx.data").exists() else [])
        if not info["nodes"]["quantized"]:
            info["warning"] = "no node was quantized: the model has no op this method handles"
        return files, info

    run.__doc__ = fn_name
    return run


register_stage("quantize", "int8-dynamic", "onnx", "onnx", "int8")(_onnx_stage("int8_dynamic"))
register_stage("quantize", "int8-static", "onnx", "onnx", "int8", uses_data=True)(_onnx_stage("int8_static"))
register_stage("quantize", "fp16", "onnx", "onnx", "fp16")(_onnx_stage("fp16"))
register_stage("quantize", "int4-weight-only", "onnx", "onnx", "int4")(_onnx_stage("int4_weight_only"))


@register_stage("quantize", "bf16", "torch", "torch", "bf16")
def _bf16(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """torch bfloat16 weights and compute (AMX-BF16 on CPUs that have it)."""
    import torch

    m = ctx.torch_session(parent).module
    mb = ctx.fresh_module(parent.info.get("arch"))
    mb.load_state_dict(m.state_dict())
    mb = mb.to(torch.bfloat16).eval()
    save_weights(mb, out / "weights.safetensors")
    n = sum(1 for p in mb.parameters())
    return ["weights.safetensors"], {"dtype": "bfloat16", "arch": parent.info.get("arch"),
                                     "nodes": {"quantized": {"all weight tensors": n}, "kept_fp32": {}},
                                     "library": "torch (tensor.to(torch.bfloat16))"}


def check_params(method: str, params: dict) -> None:
    """Validate a quantize method and its parameters before any work (no artifact is built for a bad one).

    Raises:
        StageError: unknown method, calibration method, block size or sample count.
    """
    get_stage("quantize", method)
    cal = params.get("calibration")
    if method == "int8-static" and cal is not None and cal not in CALIBRATION_METHODS:
        raise StageError(f"unknown calibration method '{cal}'; use one of {', '.join(CALIBRATION_METHODS)}")
    bsz = params.get("block_size")
    if method == "int4-weight-only" and bsz is not None and (int(bsz) < 16 or int(bsz) & (int(bsz) - 1)):
        raise StageError(f"INT4 block size {bsz} is not a power of two >= 16; use 32, 64 or 128")
    n = params.get("samples")
    if n is not None and int(n) < 1:
        raise StageError(f"calibration samples {n} must be a positive integer")


def quantize_variant(ctx: ModelContext, method: str, **params: Any) -> Variant:
    """Quantize ``ctx``'s model with ``method`` (built or taken from the cache): ``int8-dynamic``,
    ``int8-static`` (``calibration=``, ``per_channel=``, ``samples=``), ``fp16``, ``int4-weight-only``
    (``block_size=``) on the FP32 ONNX model, or ``bf16`` on the torch model. Variant names:
    the method, ``int8-static-<calibration>`` for a non-MinMax calibration, ``bf16-torch``.

    Raises:
        StageError: unknown method, or ``bf16`` on an ONNX-only model.
    """
    impl = get_stage("quantize", method)
    p = {**QUANT_DEFAULT_PARAMS.get(method, {}), **{k: v for k, v in params.items() if v is not None}}
    check_params(method, p)
    name = method if method != "bf16" else "bf16-torch"
    if method == "int8-static" and p.get("calibration", "minmax") != "minmax":
        name = f"int8-static-{p['calibration']}"
    if impl.consumes == "torch":
        if not ctx.has_torch:
            raise StageError(f"{method} needs a torch model; '{ctx.spec.name}' is ONNX: use fp16 or int8-static")
        return ctx.build(name, "quantize", method, p, ctx.baseline())
    return ctx.build(name, "quantize", method, p, onnx_parent(ctx))
