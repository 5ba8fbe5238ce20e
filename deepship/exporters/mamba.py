"""Mamba's recurrent step graph -> ONNX: ``input_ids`` int64 ``(batch, 1)`` plus per layer ``conv_state.{i}``
and ``ssm_state.{i}`` (float32) -> ``logits`` and the ``next_`` states, through the dynamo exporter
(:func:`deepship.exporters.onnx.export_onnx`, dynamic ``batch``). Parity is checked by the family
adapter (:mod:`deepship.pipeline.arch.mamba`)."""
from __future__ import annotations

from pathlib import Path

from ..models.mamba import Mamba, StepGraph, step_spec
from .onnx import ExportResult, export_onnx


def export_step_graph(model: Mamba, out_path: str | Path) -> ExportResult:
    """Export ``model.step`` as the step graph at ``out_path`` (atomically).

    Raises:
        ExportError: the export failed or fixed the batch dim.
    """
    return export_onnx(StepGraph(model.eval()).eval(), step_spec(model.cfg), out_path)
