"""Hugging Face encoders -> ONNX through Optimum (``optimum-onnx``), deepship's exporter as the fallback;
ONNX Runtime's transformer fusions; INT8 recipes for transformer encoders.

:func:`export_hf` runs ``optimum.exporters.onnx.main_export`` (task ``feature-extraction``) on the
model folder with a custom ONNX config (Optimum's own per-architecture config, minus
``token_type_ids``), then appends a pooling head to the graph: mean of ``last_hidden_state`` over
``attention_mask`` and L2 normalization, output ``sentence_embedding`` float32 ``(batch, hidden)``. The
dynamic axes are renamed to the spec's ``batch`` and ``seq``. When Optimum does not support the
architecture (or fails), the reason is logged and :func:`deepship.exporters.onnx.export_onnx` (the
dynamo exporter) exports the torch :class:`~deepship.models.hf.SentenceEncoder` instead. The
pipeline checks parity against PyTorch either way, with padded rows (:func:`padded_feeds`) so the
attention mask is exercised (:func:`deepship.pipeline.parity.parity`).

The fusions and INT8 recipes for the exported encoders are pipeline stages:
:mod:`deepship.pipeline.transformers`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..models.spec import ModelSpec
from ..utils import first_line
from .onnx import DEFAULT_OPSET, ExportResult, export_onnx, save_onnx

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
        raise OptimumUnsupported(f"Optimum has no ONNX config for model type '{cfg.model_type}' ({first_line(e, 120)})") from None
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
            raise OptimumUnsupported(f"Optimum's export failed: {type(e).__name__}: {first_line(e, 160)}") from None
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


def export_hf(module: Any, spec: ModelSpec, out_path: str | Path, opset: int = HF_OPSET,
              force_fallback: bool = False) -> tuple[ExportResult, dict[str, Any]]:
    """Export a Hugging Face encoder spec: Optimum first, deepship's dynamo exporter as the fallback.

    Args:
        module: the torch :class:`~deepship.models.hf.SentenceEncoder` (the fallback's source).
        spec: an ``hf`` spec (``extra["path"]`` is the model folder).
        force_fallback: skip Optimum (tests; architectures known to fail).

    Returns:
        ``(ExportResult, info)``; ``info["exporter"]`` names the exporter used and
        ``info["fallback_reason"]`` says why Optimum was not used.

    Raises:
        ExportError: both exporters failed.
    """
    out_path = Path(out_path)
    info: dict[str, Any] = {}
    reason = "forced (force_fallback)" if force_fallback else None
    if not force_fallback:
        try:
            files = optimum_export(spec.extra["path"], out_path, task=spec.extra.get("hf_task", "feature-extraction"),
                                   opset=opset, normalize=bool(spec.extra.get("normalize", True)))
            res = ExportResult(out_path, files, opset, dynamic_dims={t.name: t.dynamic_dims for t in spec.inputs})
            info["exporter"] = "optimum.exporters.onnx.main_export (optimum-onnx) + deepship pooling head"
            return res, info
        except OptimumUnsupported as e:
            reason = str(e)
            log.warning("%s: Optimum cannot export it (%s); falling back to deepship's exporter", spec.name, reason)
    # the dynamo exporter writes opset 18 and converts down; for encoders the conversion to 17 fails
    res = export_onnx(module, spec, out_path, opset=max(opset, DEFAULT_OPSET))
    info.update(exporter="torch.onnx.export(dynamo=True) (deepship fallback)", fallback_reason=reason)
    return res, info
