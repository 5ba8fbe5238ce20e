"""Runtimes: one :class:`Session` interface over torch eager, ONNX Runtime and the engine backends,
plus the latency harness (:mod:`deepship.runtimes.benchmark`)."""
from .session import OrtSession, Session, TorchSession, open_session  # noqa: F401
