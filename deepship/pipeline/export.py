"""The ``export/onnx`` stage (torch -> ONNX): the family's exporter, then the parity check.

The exporter is the family adapter's (:attr:`deepship.pipeline.adapters.ArchAdapter.export`: Optimum for
Hugging Face encoders) or deepship's dynamo exporter (:func:`deepship.exporters.onnx.export_onnx`).
Parity against PyTorch (:func:`deepship.pipeline.parity.parity`) runs on every export, at the example
shape and at a second one; a graph that fails it is never cached.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import StageError
from ..exporters.onnx import DEFAULT_OPSET, check_opset, check_runs, export_onnx
from .context import ModelContext
from .parity import parity
from .stages import register_stage
from .variants import Variant


@register_stage("export", "onnx", "torch", "onnx")
def _export(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """torch -> ONNX with the dynamo exporter (or the family's), named dynamic dims, parity at two shapes."""
    module = ctx.torch_session(parent).module
    if ctx.arch.export is not None:
        return ctx.arch.export(ctx, module, params, out)
    res = export_onnx(module, ctx.spec, out / "model.onnx", opset=int(params.get("opset", DEFAULT_OPSET)))
    res.parity = parity(module, ctx.spec, res.path)
    return [f.name for f in res.files], {"opset": res.opset, "parity": res.parity, "dynamic_dims": res.dynamic_dims,
                                         "exporter": "torch.onnx.export(dynamo=True)"}


def export_variant(ctx: ModelContext, opset: int | None = None) -> Variant:
    """The FP32 ONNX variant ``fp32-onnx`` of ``ctx``'s torch model (built or taken from the cache).

    Raises:
        ExportError: export or parity failed; StageError: the model is already ONNX.
    """
    if not ctx.has_torch:
        raise StageError(f"model '{ctx.spec.name}' is already ONNX; nothing to export")
    if opset is not None:
        check_opset(opset)
    # before the baseline is cached: a model that cannot run its example inputs leaves nothing behind
    ex = ctx.spec.example_inputs()
    check_runs(ctx.module(), tuple(torch.from_numpy(ex[t.name]) for t in ctx.spec.inputs), ctx.spec)
    return ctx.build("fp32-onnx", "export", ctx.arch.export_method, {"opset": opset} if opset else {}, ctx.baseline())


def onnx_parent(ctx: ModelContext, opset: int | None = None) -> Variant:
    """The FP32 ONNX model of ``ctx``: the given ``.onnx`` file, or the export of the torch model."""
    base = ctx.baseline()
    return base if base.format == "onnx" else export_variant(ctx, opset)
