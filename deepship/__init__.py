"""deepship: a deployment and inference-optimization pipeline for trained deep-learning models.

Export to ONNX with a parity check, quantize (INT8, INT4, FP16, BF16), build engines, benchmark,
and report size, latency and accuracy per variant. See :mod:`deepship.api` for the Python API.

The API functions are imported lazily, so ``import deepship`` (and the serving process, which never
runs torch) does not pay for importing torch.
"""
from __future__ import annotations

from typing import Any

from .errors import DeepshipError  # noqa: F401

__version__ = "0.1.0"
_API = ("check", "engine", "export", "load", "publish", "quantize", "report", "generate", "prune", "distill")


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'deepship' has no attribute {name!r}")
