"""Serving extensions: extra endpoints for models that are not plain request/response tensors.

An extension registered with :func:`register_extension` is installed into every app
(:func:`deepship.serving.app.create_app`) whose repository holds a model it
:meth:`~ServingExtension.applies` to. The built-in ones (:mod:`.generate`, :mod:`.asr`) register
themselves when imported; the app imports them. Extensions never import the app.
"""
from __future__ import annotations

from typing import Any, Protocol

from .repository import ServedModel


class ServingExtension(Protocol):
    """A serving extension: extra endpoints for models that are not plain request/response tensors.

    Attributes:
        name: listed in ``GET /v2`` ``extensions`` (e.g. ``"generate"``, ``"asr_stream"``).
    """

    name: str

    def applies(self, model: ServedModel) -> bool:
        """True if this extension serves ``model`` (look at ``model.kind`` and ``model.extra``)."""

    def install(self, app: Any, server: Any) -> None:
        """Add routes to ``app`` (``@app.post``, ``@app.websocket``); use ``server`` for models and metrics."""


_EXTENSIONS: dict[str, ServingExtension] = {}


def register_extension(ext: ServingExtension) -> ServingExtension:
    """Register a :class:`ServingExtension` for every app created afterwards; returns it."""
    _EXTENSIONS[ext.name] = ext
    return ext


def extensions() -> dict[str, ServingExtension]:
    """The registered extensions by name."""
    return dict(_EXTENSIONS)
