"""Engine backends behind the ``engine`` stage.

A backend turns a source model (an ONNX file, or a torch module for AOTInductor; a
:class:`BuildSource`) into an engine artifact in a folder and opens a
:class:`~deepship.runtimes.session.Session` for it. Register one with :func:`register_backend`; the
pipeline's ``engine`` stage (:mod:`deepship.pipeline.engines`) picks the source variant, gathers
calibration data and calls :meth:`EngineBackend.build`. Backends never see the pipeline.

| backend | consumes | artifact | library |
|---|---|---|---|
| ``onnxruntime`` | onnx | ONNX Runtime optimized model + session options; execution provider chosen and the one that ran recorded (:mod:`.providers`) | onnxruntime |
| ``inductor`` | torch | AOTInductor ``.pt2`` package (FP32, BF16, FP16, INT8 via PT2E), dynamic batch kept | torch, torchao |
| ``openvino`` | onnx | OpenVINO IR (``model.xml`` + ``.bin``), FP32 or INT8 by NNCF post-training quantization; performance hint and streams recorded | openvino, nncf |
| ``tensorrt`` | onnx | TensorRT serialized engine + ``engine.json`` (version, GPU, precision, profiles); runs on an NVIDIA GPU | tensorrt or tensorrt_rtx |

"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from ...errors import StageError


@dataclass
class BuildSource:
    """What an engine build gets: the source model and, on demand, its calibration data.

    Attributes:
        name: the source variant's name (for messages).
        precision: its precision (``fp32``, ``fp16``, ``int8`` for a QDQ model, ...).
        path: its main file (ONNX backends), external data beside it.
        spec: the model's :class:`~deepship.models.spec.ModelSpec` (input names, named dynamic dims,
            output names).
        module: the torch ``nn.Module`` (torch backends).
        calibration: ``() -> ({input name: array (N, ...)}, description)``: INT8 calibration samples,
            loaded only when a build asks.
        dataset: the model's :class:`~deepship.models.spec.Dataset` or ``None`` (dim sizes for tracing).
        key: a stable identity of the source and its data (names calibration caches).
    """

    name: str
    precision: str
    spec: Any
    path: Path | None = None
    module: Any = None
    calibration: Callable[[], tuple[dict, str]] | None = None
    dataset: Any = None
    key: str = ""


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

    def build(self, source: BuildSource, out_dir: Path, precision: str, params: dict) -> tuple[list[str], dict]:
        """Build ``source`` into the folder ``out_dir``; return ``(file names, info)``, the main file first."""

    def session(self, variant: Any, threads: int | None = None) -> Any:
        """Open a Session for a built engine (``variant.dir`` holds the files, ``variant.path`` the main one)."""


_BACKENDS: dict[str, EngineBackend] = {}


def register_backend(b: EngineBackend) -> EngineBackend:
    """Add (or replace) backend ``b.name``; the pipeline registers its ``engine`` stage on first use."""
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
    """Every registered backend, by name."""
    return dict(_BACKENDS)


from . import inductor as _inductor  # noqa: E402,F401
from . import onnxruntime as _ort  # noqa: E402,F401  (registers itself)
from . import openvino as _openvino  # noqa: E402,F401
from . import tensorrt as _tensorrt  # noqa: E402,F401
