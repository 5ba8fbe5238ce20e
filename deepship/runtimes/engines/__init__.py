"""Engine backends behind the ``engine`` stage.

A backend turns a parent variant (ONNX, or torch for AOTInductor) into an engine artifact and opens
a :class:`~deepship.runtimes.session.Session` for it. Register one with :func:`register_backend`.

| backend | consumes | artifact | library |
|---|---|---|---|
| ``onnxruntime`` | onnx | ONNX Runtime optimized model + session options; execution provider chosen and the one that ran recorded (:mod:`.providers`) | onnxruntime |
| ``inductor`` | torch | AOTInductor ``.pt2`` package (FP32, BF16, FP16, INT8 via PT2E), dynamic batch kept | torch, torchao |
| ``tensorrt`` | onnx | TensorRT serialized engine + ``engine.json`` (version, GPU, precision, profiles); runs on an NVIDIA GPU | tensorrt or tensorrt_rtx |

A backend may define ``parent_for(ctx, precision, params)`` to pick its parent variant for a precision
(e.g. the INT8 QDQ model); :func:`deepship.api.engine` uses it when no source is given.
"""
from __future__ import annotations

from typing import Any, Protocol

from ...errors import StageError


class EngineBackend(Protocol):
    """An engine backend.

    Attributes:
        name: backend name used by ``optimize engine --backend``.
        consumes: parent format (``onnx`` or ``torch``).
        precisions: precisions it can build.
    """

    name: str
    consumes: str
    precisions: tuple[str, ...]

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, one-line reason with the install hint)``."""

    def build(self, parent: Any, out_dir: Any, precision: str, params: dict) -> tuple[list[str], dict]:
        """Build into ``out_dir``; return ``(file names, info)``."""

    def session(self, variant: Any, threads: int | None = None) -> Any:
        """Open a Session for a built engine variant."""


_BACKENDS: dict[str, EngineBackend] = {}


def register_backend(b: EngineBackend) -> EngineBackend:
    _BACKENDS[b.name] = b
    return b


def get_backend(name: str) -> EngineBackend:
    """The backend called ``name``.

    Raises:
        StageError: unknown backend (lists the known ones).
    """
    if name not in _BACKENDS:
        raise StageError(f"unknown engine backend '{name}'; use one of {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


def backends() -> dict[str, EngineBackend]:
    return dict(_BACKENDS)


from . import onnxruntime as _ort  # noqa: E402,F401  (registers itself)
from . import inductor as _inductor  # noqa: E402,F401
from . import tensorrt as _tensorrt  # noqa: E402,F401
