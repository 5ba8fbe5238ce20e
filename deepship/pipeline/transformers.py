"""Stages for exported transformer encoders (Hugging Face models, the ``bert`` zoo entry), onnx -> onnx.

| stage / method | library | what it does |
|---|---|---|
| ``optimize`` / ``ort-transformers`` | ``onnxruntime.transformers.optimizer.optimize_model`` (model type ``bert``) | EmbedLayerNormalization, Attention, SkipLayerNormalization and BiasGelu fusions (``com.microsoft`` ops: ONNX Runtime only) |
| ``quantize`` / ``int8-transformer`` | ``onnxruntime.quantization`` ``quantize_dynamic`` / ``quantize_static`` | INT8 of a (fused) encoder: dynamic, or static QDQ (per-channel weights, MinMax-calibrated on real sentences), optional SmoothQuant (Xiao et al. 2023), nodes kept in FP32 by name pattern (the sensitive layers found by ``benchmarks/minilm.py``) |

Both register with the stage registry when this module is imported.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import StageError
from ..exporters.onnx import save_onnx
from .context import CALIBRATION_SAMPLES
from .quantize import CalibrationReader, _working_dir, matching_nodes, quantized_nodes
from .stages import register_stage

# ---- ONNX Runtime transformer fusions -------------------------------------------------------------

def fuse_transformer(src: Path, out: Path, num_heads: int = 0, hidden_size: int = 0, model_type: str = "bert") -> dict:
    """ORT's transformer optimizer (offline fusions; ``opt_level=0``, so the graph stays portable).

    Returns ``{"fusions": {op: count}, "library": ...}``. Fused ops live in the ``com.microsoft`` domain
    (ONNX Runtime only).
    """
    import onnx
    from onnxruntime.transformers import optimizer

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        lg = logging.getLogger("onnxruntime.transformers")
        lg.setLevel(logging.ERROR)
        o = optimizer.optimize_model(str(src), model_type=model_type, num_heads=int(num_heads or 0),
                                     hidden_size=int(hidden_size or 0), opt_level=0)
    stats = {k: v for k, v in o.get_fused_operator_statistics().items() if v}
    m = o.model
    have = {i.domain for i in m.opset_import}
    for dom in sorted({n.domain for n in m.graph.node if n.domain and n.domain not in ("ai.onnx",)} - have):
        m.opset_import.append(onnx.helper.make_opsetid(dom, 1))
    save_onnx(m, out)
    return {"fusions": stats, "library": "onnxruntime.transformers.optimizer.optimize_model(model_type='bert')"}


# ---- INT8 for transformer encoders ----------------------------------------------------------------

def int8_transformer(src: Path, out: Path, mode: str = "dynamic", calibration: Mapping[str, np.ndarray] | None = None,
                     exclude: Sequence[str] = (), per_channel: bool = True, reduce_range: bool = False,
                     smooth_quant: float | None = None, op_types: Sequence[str] = ("MatMul", "Attention")) -> dict:
    """INT8 of a transformer encoder (fused or not) with ONNX Runtime's quantizer.

    Args:
        mode: ``dynamic`` (``quantize_dynamic``: INT8 weights, activations quantized per call; fused
            Attention becomes QAttention) or ``static`` (``quantize_static`` QDQ, calibrated MinMax).
        calibration: real samples ``{input: (N, seq)}`` for ``static``.
        exclude: regexes of node names kept in FP32 (the sensitive layers).
        per_channel: per-output-channel weight scales.
        reduce_range: 7-bit weights (avoids the u8s8 ``vpmaddubsw`` saturation on CPUs without VNNI).
        smooth_quant: SmoothQuant alpha (static only; ``extra_options`` SmoothQuant, needs neural-compressor).

    Raises:
        StageError: unknown mode, or static without calibration samples.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    m = onnx.load(str(src))
    excluded = matching_nodes(m, exclude, ("MatMul", "Attention", "Gemm")) if exclude else []
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True}
    src = Path(src).resolve()
    with tempfile.TemporaryDirectory() as td, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), \
            _working_dir(Path(td)):  # the quantizers may write temporary files into the working directory
        warnings.simplefilter("ignore")
        tmp = Path(td) / "q.onnx"
        if mode == "dynamic":
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                             reduce_range=reduce_range, op_types_to_quantize=list(op_types),
                             nodes_to_exclude=excluded, extra_options=extra)
        elif mode == "static":
            if calibration is None:
                raise StageError("int8-transformer static needs calibration samples")
            if smooth_quant is not None:
                extra.update(SmoothQuant=True, SmoothQuantAlpha=float(smooth_quant), SmoothQuantFolding=True)
            quantize_static(str(src), str(tmp), CalibrationReader(calibration, batch_size=32),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(op_types),
                            nodes_to_exclude=excluded, extra_options=extra)
        else:
            raise StageError(f"unknown int8-transformer mode '{mode}'; use dynamic or static")
        qm = onnx.load(str(tmp))
        save_onnx(qm, out)
    return {"nodes": quantized_nodes(m, qm), "mode": mode, "per_channel": per_channel, "reduce_range": reduce_range,
            "excluded_nodes": excluded, "smooth_quant": smooth_quant,
            "library": f"onnxruntime.quantization.quantize_{mode}"}


# ---- stages ---------------------------------------------------------------------------------------

@register_stage("optimize", "ort-transformers", "onnx", "onnx")
def _fuse(ctx, parent, params, out):
    """ONNX Runtime transformer optimizer fusions (Attention, SkipLayerNormalization, BiasGelu)."""
    ex = ctx.spec.extra
    info = fuse_transformer(parent.path, out / "model.onnx", ex.get("num_heads") or 0, ex.get("hidden_size") or 0,
                            params.get("model_type", "bert"))
    return ["model.onnx"] + (["model.onnx.data"] if (out / "model.onnx.data").exists() else []), info


@register_stage("quantize", "int8-transformer", "onnx", "onnx", "int8", uses_data=True)
def _int8(ctx, parent, params, out):
    """INT8 for transformer encoders: dynamic or static QDQ, sensitive nodes kept FP32."""
    calib = None
    desc = None
    if params.get("mode", "dynamic") == "static":
        calib, desc = ctx.calibration(int(params.get("samples", CALIBRATION_SAMPLES)))
    info = int8_transformer(parent.path, out / "model.onnx", mode=params.get("mode", "dynamic"), calibration=calib,
                            exclude=tuple(params.get("exclude", ())), per_channel=bool(params.get("per_channel", True)),
                            reduce_range=bool(params.get("reduce_range", False)),
                            smooth_quant=params.get("smooth_quant"))
    if desc:
        info["calibration_data"] = desc
    return ["model.onnx"] + (["model.onnx.data"] if (out / "model.onnx.data").exists() else []), info
