"""Exporters: torch -> ONNX with named dynamic dims and a parity check (:mod:`.onnx`)."""
from .onnx import DEFAULT_OPSET, ExportResult, export_onnx, parity  # noqa: F401
