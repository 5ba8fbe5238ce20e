"""The serving process: loads built variants and answers the Open Inference Protocol (KServe v2).

- :mod:`.repository`: which variants to load (a ``report.json``, ``.onnx`` files, variant or
  engine folders), their names (``<model>-<variant>``), signatures and warm-up.
- :mod:`.protocol`: the REST codecs (JSON tensors and Triton's binary tensor data extension),
  request validation against the model's signature.
- :mod:`.batcher`: Triton-style dynamic batching with a bounded queue, per-request timeouts and
  503 + ``Retry-After`` under overload.
- :mod:`.metrics`: Prometheus metrics at ``/metrics``.
- :mod:`.extensions`: the extension point for generation and streaming endpoints; :mod:`.generate`
  (Triton's generate extension for KV-cache decoders) and :mod:`.asr` (WebSocket streaming ASR).
- :mod:`.app`: the FastAPI app; it installs the registered extensions.
- :mod:`.server`: ``optimize serve`` (uvicorn) and an in-process server for tests.

See ``docs/serving.md``.
"""
from .app import InferenceServer, ServerConfig, create_app  # noqa: F401
from .batcher import BatcherConfig, DynamicBatcher, PadSpec  # noqa: F401
from .extensions import ServingExtension, register_extension  # noqa: F401
from .protocol import RequestError  # noqa: F401
from .repository import ModelRepository, ServedModel, ServingError, load_repository  # noqa: F401
from .server import serve, start_in_thread  # noqa: F401
