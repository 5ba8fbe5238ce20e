"""The ``DeepshipError`` family.

Every error a user can cause (bad model name, bad weights, bad ONNX file, bad input shape, an
unwritable folder, an impossible chain of stages) is raised as a subclass of :class:`DeepshipError`
with a one-line message that names the thing and the fix. The CLI prints the message without a
traceback and exits with status 2 (:data:`EXIT_USER_ERROR`).
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class DeepshipError(Exception):
    """Base class: a one-line, user-facing error message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class UnknownModelError(DeepshipError):
    """A model reference that is neither a zoo name, ``module:factory``, ``.pt2`` nor ``.onnx``."""


class WeightsError(DeepshipError):
    """Weights that are missing, corrupt, or do not fit the model."""


class InputSpecError(DeepshipError):
    """An input spec that cannot be parsed, or an input array of the wrong name, shape or dtype."""


class ExportError(DeepshipError):
    """The ONNX export failed, or the exported graph failed its parity check."""


class ArtifactError(DeepshipError):
    """A model file (ONNX, external data, engine) that is missing or corrupt."""


class StageError(DeepshipError):
    """A stage that cannot run on its input (wrong format, unsupported method, impossible chain)."""


class OutputPathError(DeepshipError):
    """An output folder or file that cannot be written."""


class DataError(DeepshipError):
    """Evaluation data (``.npz``) that is missing keys or does not fit the model."""


class GateError(DeepshipError):
    """A report or baseline for ``optimize check`` that cannot be read or compared."""
