"""Runtimes: one Session interface over torch eager and ONNX Runtime (:mod:`.session`), engine backends
(:mod:`.engines`), the latency harness (:mod:`.benchmark`), KV-cache runners, sampling and generation
(:mod:`.kvcache`, :mod:`.sampling`, :mod:`.generate`), and the streaming ASR runner (:mod:`.asr_stream`)."""
from .session import OrtSession, Session, TorchSession  # noqa: F401
