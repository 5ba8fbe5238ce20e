"""The HTTP application: Open Inference Protocol (KServe v2) REST endpoints over a model repository.

| method | path | answer |
|---|---|---|
| GET | ``/v2/health/live`` | 200 while the process runs |
| GET | ``/v2/health/ready`` | 200 when every model is loaded and warm, else 503 |
| GET | ``/v2`` | server metadata: name, version, protocol extensions |
| GET | ``/v2/models/{name}`` | model metadata (inputs, outputs, datatypes, shapes) |
| GET | ``/v2/models/{name}/ready`` | 200 ready, 404 unknown model |
| GET | ``/v2/models/{name}/config`` | Triton-style model configuration (batching settings included) |
| POST | ``/v2/models/{name}/infer`` | inference; JSON or binary tensor data |
| POST | ``/v2/repository/index`` | the served models and their state |
| GET | ``/metrics`` | Prometheus metrics (:mod:`deepship.serving.metrics`) |
| POST | ``/v2/models/{name}/generate``, ``.../generate_stream`` | token generation for KV-cache decoders (:mod:`deepship.serving.generate`) |
| WS | ``/v2/models/{name}/stream`` | streaming speech recognition for ASR chunk models (:mod:`deepship.serving.asr`) |

Every ``/v2/models/{name}/...`` path also answers as ``/v2/models/{name}/versions/1/...`` (each
variant is its own model, with the single version ``1``). Errors are ``{"error": "<one line>"}``
with 400 (bad input: wrong name, datatype, shape), 404 (unknown model or version), 411/413 (body
length missing or over the limit), 415 (compressed body), 503 with ``Retry-After`` (queue full,
timeout, shutting down) and 500 only when a runtime fails on valid input (the server keeps running).

Extension point (token generation, streaming ASR): a :class:`~deepship.serving.extensions.ServingExtension` registered with
:func:`register_extension` is installed into every app whose repository holds a model it
:meth:`~ServingExtension.applies` to; it adds its own routes (HTTP, server-sent events, WebSocket)
to the FastAPI app and uses the :class:`InferenceServer` (repository, metrics, batchers, config).
See ``docs/serving.md``.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import unquote

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..utils import first_line
from . import asr as _asr  # noqa: F401  (the built-in extensions register on import)
from . import generate as _generate  # noqa: F401
from .batcher import BatcherConfig, DynamicBatcher, PadSpec
from .extensions import extensions
from .metrics import ServingMetrics
from .protocol import (HEADER_LENGTH, RequestError, decode_infer_request, encode_infer_response, model_config,
                       model_metadata)
from .repository import ModelRepository, ServedModel, ServingError, valid_name

SERVER_NAME = "deepship"
#: Protocol extensions every deepship server speaks (``GET /v2``); registered extensions add theirs.
BASE_EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"]


@dataclass
class ServerConfig:
    """Serving settings.

    Attributes:
        host: interface to bind; ``127.0.0.1`` (loopback only) unless told otherwise.
        port: TCP port (``0``: any free port).
        batching: :class:`~deepship.serving.batcher.BatcherConfig` for every model.
        max_body_bytes: largest request body accepted, in bytes (larger: 413).
        max_connections: concurrent connections uvicorn accepts before answering 503 itself.
        threads: intra-op threads per model session (default: all cores but one).
        kv_slots: KV-cache slots per fused-attention decoder, i.e. generations decoded together by
            continuous batching (:mod:`deepship.serving.scheduler`); more requests wait in a queue of
            ``batching.max_queue_size`` and beyond that get 503.
        prefill_chunk: prompt tokens a decoder feeds per scheduler step (chunked prefill).
        adapters: LoRA adapters served unmerged on the fused-attention decoders of the model each was
            trained on: ``{name: PEFT adapter folder}``; a generation request picks one with
            ``parameters.adapter``.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    batching: BatcherConfig = field(default_factory=BatcherConfig)
    max_body_bytes: int = 16 * 2 ** 20
    max_connections: int = 2048
    threads: int | None = None
    kv_slots: int = 32
    prefill_chunk: int = 128
    adapters: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class InferenceServer:
    """The state behind the app: repository, one :class:`DynamicBatcher` per model, metrics, readiness.

    Args:
        repository: the loaded, warmed-up models.
        config: :class:`ServerConfig`.
    """

    def __init__(self, repository: ModelRepository, config: ServerConfig | None = None):
        self.repository = repository
        self.config = config or ServerConfig()
        self.metrics = ServingMetrics(repository.names())
        self.batchers: dict[str, DynamicBatcher] = {
            m.name: DynamicBatcher(m.name, m.run, replace(self.config.batching, **m.batching),
                                   can_batch=m.max_batch_size > 0,
                                   observe=self.metrics.observer(m.name), pad=PadSpec.of(m.inputs, m.outputs))
            for m in repository.models.values()
        }
        self.ready = False
        self.extensions: list[str] = []
        self.on_stop: list = []  # callables run at shutdown (an extension's worker threads)

    async def start(self) -> None:
        for b in self.batchers.values():
            b.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await asyncio.gather(*(b.stop() for b in self.batchers.values()))
        for fn in self.on_stop:
            fn()

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The served model ``name``.

        Raises:
            RequestError: 400 for an invalid name, 404 for an unknown model or a version other than the one served
                (1, or the version a Triton repository selects).
        """
        if not valid_name(name):
            raise RequestError(f"invalid model name '{name[:64]}'; names use letters, digits, '.', '_' and '-'", 400)
        m = self.repository.get(name)
        if m is None:
            names = self.repository.names()
            raise RequestError(f"unknown model '{name}'; served models: {', '.join(names[:20])}"
                               + (" ..." if len(names) > 20 else ""), 404)
        served = str(m.source.get("version") or "1")  # a Triton repository's newest version, else 1
        if version not in (None, "", served):
            raise RequestError(f"model '{name}' has no version '{version[:16]}'; deepship serves version {served}", 404)
        return m

    async def read_body(self, headers: dict[bytes, bytes], receive) -> bytes:
        """The request body from ASGI ``receive``, refusing more than ``max_body_bytes`` (413, checked
        against ``Content-Length`` before reading and while reading) and compressed bodies (415)."""
        limit = self.config.max_body_bytes
        enc = headers.get(b"content-encoding")
        if enc and enc.lower() != b"identity":
            raise RequestError(f"Content-Encoding {enc[:20].decode('latin-1')} is not supported; "
                               "send the body uncompressed", 415)
        cl = headers.get(b"content-length")
        if cl is not None:
            if not cl.isdigit():
                raise RequestError("Content-Length is not a number", 400)
            if int(cl) > limit:
                raise RequestError(f"request body of {int(cl)} bytes exceeds the limit of {limit} bytes; "
                                   "send smaller batches", 413)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise RequestError("client disconnected", 499)
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(f"request body exceeds the limit of {limit} bytes; send smaller batches", 413)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def infer(self, name: str, version: str | None, headers: dict[bytes, bytes], receive
                    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Answer one ``/infer`` request: ``(status, response headers, body)`` (statuses: module docstring).

        Never raises: a failure inside the runtime is a 500 for this request only.
        """
        t0 = time.perf_counter()
        label, status, samples = "unknown", 500, 0
        if valid_name(name) and self.repository.get(name) is not None:
            label = name  # an unknown version of a served model counts under that model
        try:
            model = self.model(name, version)
            batcher = self.batchers[model.name]
            batcher.admit()  # shed overload before reading and decoding the body
            body = await self.read_body(headers, receive)
            hl = headers.get(b"inference-header-content-length")
            req = decode_infer_request(body, None if hl is None else hl.decode("latin-1"), model)
            outs = await batcher.submit(
                req.inputs, req.batch, None if req.timeout_us is None else req.timeout_us / 1e6)
            payload, hlen = encode_infer_response(model.name, req, outs, model.output_names)
            status, samples = 200, req.batch
            if hlen is None:
                return 200, [(b"content-type", b"application/json")], payload
            return 200, [(b"content-type", b"application/octet-stream"),
                         (HEADER_LENGTH.lower().encode(), str(hlen).encode())], payload
        except RequestError as e:
            status = e.status
            return (e.status, [(b"content-type", b"application/json")]
                    + ([(b"retry-after", str(e.retry_after_s).encode())] if e.retry_after_s is not None else []),
                    orjson.dumps({"error": str(e)}))
        except Exception as e:  # never let one request take the process down
            return 500, [(b"content-type", b"application/json")], orjson.dumps(
                {"error": f"internal error: {type(e).__name__}: {str(e)[:160]}"})
        finally:
            self.metrics.request(label, status, time.perf_counter() - t0, samples)


#: ``/v2/models/{name}[/versions/{version}]/infer`` (name and version: anything but ``/``), matched on
#: the raw (still percent-encoded) path, so ``..%2Fetc`` is a name (then refused as invalid), not a path
INFER_PATH = re.compile(rb"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
#: any ``/v2/models/{name}/...`` path, raw, for the errors of routes that did not match
MODEL_PATH = re.compile(rb"^/v2/models/(?P<name>[^/]+)(?:/|$)")


class InferMiddleware:
    """ASGI app answering ``POST /v2/models/{name}[/versions/{version}]/infer`` itself (the hot
    path skips Starlette's middleware stack, routing and request objects: about 20-90 us less CPU per
    request here) and passing every other request, and the lifespan, to the FastAPI app ``app``."""

    def __init__(self, app, server: InferenceServer):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            m = INFER_PATH.match(scope.get("raw_path") or scope["path"].encode())
            if m is not None:
                version = unquote(m["version"].decode("latin-1")) if m["version"] else None
                status, headers, body = await self.server.infer(unquote(m["name"].decode("latin-1")), version,
                                                                dict(scope["headers"]), receive)
                headers.append((b"content-length", str(len(body)).encode()))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def error_response(e: RequestError) -> Response:
    """``{"error": message}`` with the error's status (and ``Retry-After`` for 503)."""
    headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
    return Response(orjson.dumps({"error": str(e)}), e.status, headers, media_type="application/json")


def create_app(server: InferenceServer) -> "InferMiddleware":
    """The ASGI application for ``server``: :class:`InferMiddleware` answering ``POST .../infer`` in
    front of a FastAPI app (``.app``) with every other endpoint and the registered extensions.

    Start it with uvicorn (:func:`deepship.serving.server.serve` or
    :func:`deepship.serving.server.start_in_thread`); the batchers start in the app's lifespan.
    """
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="deepship serving", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    server.extensions = []

    async def on_request_error(request: Request, exc: RequestError) -> Response:
        return error_response(exc)

    app.add_exception_handler(RequestError, on_request_error)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # every non-2xx answer carries {"error": ...}, as the protocol (and tritonclient) expect
        raw = request.scope.get("raw_path") or request.url.path.encode()
        m = MODEL_PATH.match(raw)
        if m is not None and not valid_name(unquote(m["name"].decode("latin-1"))):
            return error_response(RequestError(f"invalid model name '{unquote(m['name'].decode('latin-1'))[:64]}'; "
                                               "names use letters, digits, '.', '_' and '-'", 400))
        if exc.status_code == 404:
            msg = (f"no endpoint {request.method} {request.url.path}; deepship serves the Open Inference Protocol "
                   "(KServe v2) under /v2: see GET /v2 for its extensions")
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return error_response(RequestError(msg, exc.status_code))

    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(RequestError(f"bad request to {request.url.path}: {first_line(str(exc), 160)}", 400))

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if server.ready else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": __version__, "extensions": BASE_EXTENSIONS + server.extensions}

    @app.post("/v2/repository/index")
    async def repository_index():
        return [{"name": n, "version": "1", "state": "READY" if server.ready else "UNAVAILABLE"}
                for n in server.repository.names()]

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), 200, media_type=server.metrics.content_type)

    @app.get("/v2/models/stats")
    async def all_stats():
        return server.metrics.model_stats(server.repository.names())

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        async def metadata(name: str, version: str | None = None):
            return model_metadata(server.model(name, version))

        async def model_ready(name: str, version: str | None = None):
            m = server.model(name, version)
            return Response(status_code=200 if server.ready and m else 503)

        async def config(name: str, version: str | None = None):
            m = server.model(name, version)
            return model_config(m, server.batchers[m.name].config.to_dict())

        async def stats(name: str, version: str | None = None):
            return server.metrics.model_stats([server.model(name, version).name])

        app.get(prefix)(metadata)
        app.get(prefix + "/ready")(model_ready)
        app.get(prefix + "/config")(config)
        app.get(prefix + "/stats")(stats)

    def unsupported(what: str, why: str):
        async def answer(request: Request):
            raise RequestError(f"{what} is not supported by deepship: {why}", 400)
        return answer

    fixed = "the repository is fixed when the server starts (optimize serve ARGS); restart it to change models"
    for path, what, why in [
            ("/v2/repository/models/{name}/load", "model load", fixed),
            ("/v2/repository/models/{name}/unload", "model unload", fixed),
            ("/v2/trace/setting", "trace settings", "use /metrics and the statistics extension"),
            ("/v2/models/{name}/trace/setting", "trace settings", "use /metrics and the statistics extension"),
            ("/v2/logging", "log settings", "the server logs to stderr at a fixed level"),
            ("/v2/systemsharedmemory/status", "system shared memory", "send tensors in the request body"),
            ("/v2/systemsharedmemory/region/{region}/status", "system shared memory", "send tensors in the request body"),
            ("/v2/systemsharedmemory/region/{region}/register", "system shared memory", "send tensors in the request body"),
            ("/v2/systemsharedmemory/region/{region}/unregister", "system shared memory", "send tensors in the request body"),
            ("/v2/systemsharedmemory/unregister", "system shared memory", "send tensors in the request body"),
            ("/v2/cudasharedmemory/status", "CUDA shared memory", "send tensors in the request body"),
            ("/v2/cudasharedmemory/region/{region}/status", "CUDA shared memory", "send tensors in the request body"),
            ("/v2/cudasharedmemory/region/{region}/register", "CUDA shared memory", "send tensors in the request body"),
            ("/v2/cudasharedmemory/region/{region}/unregister", "CUDA shared memory", "send tensors in the request body"),
            ("/v2/cudasharedmemory/unregister", "CUDA shared memory", "send tensors in the request body")]:
        app.api_route(path, methods=["GET", "POST"])(unsupported(what, why))

    for ext in extensions().values():
        if any(ext.applies(m) for m in server.repository.models.values()):
            ext.install(app, server)
            server.extensions.append(ext.name)
    if server.config.adapters and "generate" not in server.extensions:
        raise ServingError(f"--adapter {next(iter(server.config.adapters))}: no KV-cache decoder is served; serve the "
                           "fp32-onnx-fused row of the model the adapter was trained for")
    # the hot path: POST .../infer is answered in front of FastAPI (no middleware stack, routing or
    # Request objects per inference request)
    return InferMiddleware(app, server)
