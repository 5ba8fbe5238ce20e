"""Exporters: torch -> ONNX graphs, and nothing that runs them.

| module | what it writes |
|---|---|
| :mod:`.onnx` | any module through the dynamo exporter, named dynamic dims kept (and checked) |
| :mod:`.kv` | a decoder's prefill and decode-step graphs with an explicit KV cache, weights shared |
| :mod:`.hf` | a Hugging Face encoder through Optimum's exporter, with a pooling head |
| :mod:`.mamba` | a Mamba model's recurrent step graph with explicit conv and SSM state |

Parity against PyTorch is the pipeline's comparator (:mod:`deepship.pipeline.parity`).
"""
from .onnx import DEFAULT_OPSET, ExportResult, export_onnx  # noqa: F401
