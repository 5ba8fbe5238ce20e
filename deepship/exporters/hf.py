"""Hugging Face encoders -> ONNX through Optimum (``optimum-onnx``), deepship's exporter as the fallback;
ONNX Runtime's transformer fusions; INT8 recipes for transformer encoders.

:func:`export_hf` runs ``optimum.exporters.onnx.main_export`` (task ``feature-extraction``) on the
model folder with a custom ONNX config (Optimum's own per-architecture config, minus
``token_type_ids``), then appends a pooling head to the graph: mean of ``last_hidden_state`` over
``attention_mask`` and L2 normalization, output ``sentence_embedding`` float32 ``(batch, hidden)``. The
dynamic axes are renamed to the spec's ``batch`` and ``seq``. When Optimum does not support the
architecture (or fails), the reason is logged and :func:`deepship.exporters.onnx.export_onnx` (the
dynamo exporter) exports the torch :class:`~deepship.models.hf.SentenceEncoder` instead. Either way,
parity against PyTorch is checked at the example shape and a second shape, with padded rows
(attention mask respected).

:func:`fuse_transformer` runs ``onnxruntime.transformers.optimizer.optimize_model`` (model type
``bert``): EmbedLayerNormalization, Attention, SkipLayerNormalization and BiasGelu fusions.

:func:`int8_transformer`: INT8 of a (fused) encoder with ONNX Runtime's quantizer, dynamic or
static QDQ (per-channel weights, calibrated on real sentences), optional SmoothQuant (Xiao et al.
2023) and nodes kept in FP32 by name pattern (the sensitive layers found by ``benchmarks/minilm.py``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ExportError, StageError
from ..models.spec import EXAMPLE_DIM_SIZES, SECOND_DIM_SIZES, ModelSpec
from .onnx import ExportResult, save_onnx

log = logging.getLogger("deepship.exporters.hf")

#: opset of Hugging Face exports: 17, not 18, because ONNX Runtime's transformer optimizer (1.32) matches
#: its LayerNormalization/Attention patterns only on opset-17 graphs (at 18 it fuses BiasGelu alone)
HF_OPSET = 17

#: Optimum's dynamic axis names -> the spec's
_AXES = {"batch_size": "batch", "sequence_length": "seq"}


class OptimumUnsupported(Exception):
    """Optimum cannot export this model (architecture or task not supported, or its export failed)."""


def _optimum_config(model_dir: str, task: str):
    """Optimum's ONNX config for the folder's architecture, without ``token_type_ids`` as an input."""
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    try:
        ctor = TasksManager.get_exporter_config_constructor(exporter="onnx", model_type=cfg.model_type, task=task,
                                                            library_name="transformers")
    except Exception as e:
        raise OptimumUnsupported(f"Optimum has no ONNX config for model type '{cfg.model_type}' ({str(e).splitlines()[0][:120]})") from None
    base = ctor(cfg, task=task)
    klass = type(base)

    class NoTokenTypes(klass):  # type: ignore[misc, valid-type]
        @property
        def inputs(self):
            d = dict(super().inputs)
            d.pop("token_type_ids", None)
            return d

    return NoTokenTypes(cfg, task=task)


def add_pooling_head(model_proto, normalize: bool = True, hidden_name: str = "last_hidden_state",
                     mask_name: str = "attention_mask", out_name: str = "sentence_embedding") -> None:
    """Append mean pooling over the mask (+ L2 normalization) to an encoder graph, in place.

    ``sentence_embedding = normalize(sum(h * m, 1) / max(sum(m, 1), 1e-9))`` with ``x / max(|x|, 1e-12)``,
    as sentence-transformers' Pooling and Normalize modules. The new output comes first.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model_proto.graph
    opset = next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), 18)
    hid = next(o for o in g.output if o.name == hidden_name)
    H = hid.type.tensor_type.shape.dim[-1].dim_value
    c = lambda n, v, dt=np.int64: g.initializer.append(numpy_helper.from_array(np.asarray(v, dt), n))  # noqa: E731
    c("pool_axes_last", [-1]); c("pool_axes_seq", [1])
    c("pool_eps_count", 1e-9, np.float32); c("pool_eps_norm", 1e-12, np.float32)
    nodes = [
        helper.make_node("Cast", [mask_name], ["pool_mask_f"], to=TensorProto.FLOAT, name="pool_cast"),
        helper.make_node("Unsqueeze", ["pool_mask_f", "pool_axes_last"], ["pool_mask_u"], name="pool_unsq"),
        helper.make_node("Mul", [hidden_name, "pool_mask_u"], ["pool_masked"], name="pool_mul"),
        helper.make_node("ReduceSum", ["pool_masked", "pool_axes_seq"], ["pool_sum"], keepdims=0, name="pool_sum"),
        helper.make_node("ReduceSum", ["pool_mask_u", "pool_axes_seq"], ["pool_count"], keepdims=0, name="pool_count"),
        helper.make_node("Max", ["pool_count", "pool_eps_count"], ["pool_count_c"], name="pool_clamp"),
        helper.make_node("Div", ["pool_sum", "pool_count_c"], ["pool_mean" if normalize else out_name], name="pool_div"),
    ]
    if normalize:
        nodes += [
            helper.make_node("ReduceL2", ["pool_mean", "pool_axes_last"], ["pool_norm"], keepdims=1, name="pool_l2")
            if opset >= 18 else
            helper.make_node("ReduceL2", ["pool_mean"], ["pool_norm"], axes=[-1], keepdims=1, name="pool_l2"),
            helper.make_node("Max", ["pool_norm", "pool_eps_norm"], ["pool_norm_c"], name="pool_norm_clamp"),
            helper.make_node("Div", ["pool_mean", "pool_norm_c"], [out_name], name="pool_normalize"),
        ]
    g.node.extend(nodes)
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", H or "hidden"])
    outs = [out] + list(g.output)
    del g.output[:]
    g.output.extend(outs)


def _rename_axes(model_proto) -> None:
    for vi in list(model_proto.graph.input) + list(model_proto.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in _AXES:
                d.dim_param = _AXES[d.dim_param]


def optimum_export(model_dir: str, out_path: Path, task: str = "feature-extraction", opset: int = HF_OPSET,
                   normalize: bool = True) -> list[Path]:
    """Optimum ``main_export`` of ``model_dir`` + the pooling head; returns the files written.

    Raises:
        OptimumUnsupported: no ONNX config for the architecture, or Optimum's export failed.
    """
    import onnx

    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise OptimumUnsupported(f"optimum-onnx is not importable ({e})") from None
    cfg = _optimum_config(model_dir, task)
    with tempfile.TemporaryDirectory() as td, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        lg = logging.getLogger("optimum")
        old = lg.level
        lg.setLevel(logging.ERROR)
        try:
            main_export(model_dir, td, task=task, opset=opset, library_name="transformers", do_validation=False,
                        local_files_only=True, custom_onnx_configs={"model": cfg}, no_post_process=True)
        except Exception as e:
            raise OptimumUnsupported(f"Optimum's export failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None
        finally:
            lg.setLevel(old)
        mp = onnx.load(str(Path(td) / "model.onnx"))
    if "last_hidden_state" not in {o.name for o in mp.graph.output}:
        raise OptimumUnsupported("Optimum's graph has no last_hidden_state output")
    _rename_axes(mp)
    add_pooling_head(mp, normalize=normalize)
    mp.producer_name = "deepship (optimum-onnx)"
    onnx.checker.check_model(mp)
    return save_onnx(mp, out_path)


def padded_feeds(spec: ModelSpec, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with a real padding pattern: row i keeps a random length in [1, seq] (row 0 full)."""
    rng = np.random.default_rng(seed)
    b, s = int(sizes.get("batch", 2)), int(sizes.get("seq", 16))
    ids_spec = next(t for t in spec.inputs if t.name == "input_ids")
    ids = rng.integers(max(int(ids_spec.low), 1000 if ids_spec.high > 2000 else 1), int(ids_spec.high), size=(b, s)).astype(np.int64)
    lens = rng.integers(1, s + 1, size=b)
    lens[0] = s
    mask = (np.arange(s)[None, :] < lens[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def parity_padded(reference: Any, spec: ModelSpec, onnx_path: Path, atol: float = 1e-4,
                  rtol: float = 1e-3) -> dict[str, Any]:
    """ONNX Runtime against the torch ``reference`` at the example shape and a second shape (different
    batch and seq), with padded rows, on every output (padding positions of ``last_hidden_state`` are
    compared too). Same dict as :func:`deepship.exporters.onnx.parity`.

    Raises:
        ExportError: an output differs beyond ``atol + rtol * max|reference|`` or has another shape.
    """
    from ..runtimes.session import OrtSession, TorchSession

    ort_s = OrtSession(onnx_path, threads=1)
    tor_s = TorchSession(reference, [t.name for t in spec.inputs], spec.output_names)
    out: dict[str, Any] = {}
    for label, sz in (("example", EXAMPLE_DIM_SIZES), ("second_shape", SECOND_DIM_SIZES)):
        feeds = padded_feeds(spec, sz, seed=1)
        a, b = ort_s.run(feeds), tor_s.run(feeds)
        worst = {"max_abs": 0.0, "max_rel": 0.0}
        for name in spec.output_names:
            x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
            if x.shape != y.shape:
                raise ExportError(f"ONNX output '{name}' has shape {x.shape}, PyTorch {y.shape} at "
                                  f"{ {k: v.shape for k, v in feeds.items()} }; a dim was fixed during export")
            err, ref = float(np.abs(x - y).max()), float(np.abs(y).max())
            if err > atol + rtol * ref:
                raise ExportError(f"parity failed for output '{name}' at input shapes "
                                  f"{ {k: tuple(v.shape) for k, v in feeds.items()} }: max abs error {err:.3g} "
                                  f"> {atol + rtol * ref:.3g}")
            worst = {"max_abs": max(worst["max_abs"], err), "max_rel": max(worst["max_rel"], err / ref if ref else err)}
        out[label] = {"shape": {k: list(v.shape) for k, v in feeds.items()}, **worst, "ok": True}
    out["ok"] = True
    return out


def export_hf(module: Any, spec: ModelSpec, out_path: str | Path, opset: int = HF_OPSET,
              force_fallback: bool = False) -> tuple[ExportResult, dict[str, Any]]:
    """Export a Hugging Face encoder spec: Optimum first, deepship's dynamo exporter as the fallback.

    Args:
        module: the torch :class:`~deepship.models.hf.SentenceEncoder` (parity reference and fallback).
        spec: an ``hf`` spec (``extra["path"]`` is the model folder).
        force_fallback: skip Optimum (tests; architectures known to fail).

    Returns:
        ``(ExportResult, info)``; ``info["exporter"]`` names the exporter used and
        ``info["fallback_reason"]`` says why Optimum was not used.

    Raises:
        ExportError: both exporters failed, or parity failed.
    """
    from .onnx import export_onnx

    out_path = Path(out_path)
    info: dict[str, Any] = {}
    reason = "forced (force_fallback)" if force_fallback else None
    if not force_fallback:
        try:
            files = optimum_export(spec.extra["path"], out_path, task=spec.extra.get("hf_task", "feature-extraction"),
                                   opset=opset, normalize=bool(spec.extra.get("normalize", True)))
            res = ExportResult(out_path, files, opset, dynamic_dims={t.name: t.dynamic_dims for t in spec.inputs})
            res.parity = parity_padded(module, spec, out_path)
            info["exporter"] = "optimum.exporters.onnx.main_export (optimum-onnx) + deepship pooling head"
            return res, info
        except OptimumUnsupported as e:
            reason = str(e)
            log.warning("%s: Optimum cannot export it (%s); falling back to deepship's exporter", spec.name, reason)
    res = export_onnx(module, spec, out_path, opset=opset)
    res.parity = parity_padded(module, spec, out_path)
    info.update(exporter="torch.onnx.export(dynamo=True) (deepship fallback)", fallback_reason=reason)
    return res, info


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

def matching_nodes(model_proto, patterns: Sequence[str], op_types: Sequence[str] = ("MatMul", "Attention", "Gemm")) -> list[str]:
    """Names of ``op_types`` nodes whose name matches any regex in ``patterns``."""
    rx = [re.compile(p) for p in patterns]
    return [n.name for n in model_proto.graph.node if n.op_type in op_types and any(r.search(n.name) for r in rx)]


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

    from ..pipeline.quantize import CalibrationReader, quantized_nodes

    m = onnx.load(str(src))
    excluded = matching_nodes(m, exclude) if exclude else []
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True}
    with tempfile.TemporaryDirectory() as td, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
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

def register_stages() -> None:
    """Register ``optimize/ort-transformers`` (onnx -> onnx) and ``quantize/int8-transformer``
    (onnx -> onnx) with the pipeline (idempotent)."""
    from ..pipeline import stages as S

    if ("optimize", "ort-transformers") in S._STAGES:
        return

    @S.register_stage("optimize", "ort-transformers", "onnx", "onnx")
    def _fuse(ctx, parent, params, out):
        """ONNX Runtime transformer optimizer fusions (Attention, SkipLayerNormalization, BiasGelu)."""
        ex = ctx.spec.extra
        info = fuse_transformer(parent.path, out / "model.onnx", ex.get("num_heads") or 0, ex.get("hidden_size") or 0,
                                params.get("model_type", "bert"))
        return ["model.onnx"] + (["model.onnx.data"] if (out / "model.onnx.data").exists() else []), info

    @S.register_stage("quantize", "int8-transformer", "onnx", "onnx", "int8")
    def _int8(ctx, parent, params, out):
        """INT8 for transformer encoders: dynamic or static QDQ, sensitive nodes kept FP32."""
        calib = None
        desc = None
        if params.get("mode", "dynamic") == "static":
            calib, desc = ctx.calibration(int(params.get("samples", S.CALIBRATION_SAMPLES)))
        info = int8_transformer(parent.path, out / "model.onnx", mode=params.get("mode", "dynamic"), calibration=calib,
                                exclude=tuple(params.get("exclude", ())), per_channel=bool(params.get("per_channel", True)),
                                reduce_range=bool(params.get("reduce_range", False)),
                                smooth_quant=params.get("smooth_quant"))
        if desc:
            info["calibration_data"] = desc
        return ["model.onnx"] + (["model.onnx.data"] if (out / "model.onnx.data").exists() else []), info
