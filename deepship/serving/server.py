"""Running the serving process: ``optimize serve`` (blocking, :func:`serve`) and an in-process server
in a background thread for tests and scripts (:func:`start_in_thread`).

Start-up order: bind the port (a port in use fails at once), load and warm up every model (a bad
model file fails start-up with its name), then start uvicorn; ``/v2/health/ready`` answers 200
once the batchers run. uvicorn uses uvloop and httptools when they are installed.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Callable, Sequence

from .app import InferenceServer, ServerConfig, create_app
from .repository import ServingError, load_repository
from .triton_repo import is_triton_repository, load_triton_repository


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (not yet listening).

    Raises:
        ServingError: the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServingError(f"cannot bind {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _uvicorn_config(app, config: ServerConfig):
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                          limit_concurrency=config.max_connections, timeout_keep_alive=5,
                          timeout_graceful_shutdown=5)


def serve(refs: Sequence[str], config: ServerConfig | None = None, variants: Sequence[str] | None = None,
          models: Sequence[str] | None = None, log: Callable[[str], None] = print) -> None:
    """Load the models and serve them until interrupted (Ctrl-C or SIGTERM).

    Args:
        refs: one ``report.json``, a Triton model repository folder (``optimize deploy triton``;
            per-model batching from its ``config.pbtxt``), or ``.onnx`` files / variant folders (``NAME=PATH``).
        config: :class:`ServerConfig` (default: 127.0.0.1:8000, dynamic batching on).
        variants, models: filters for a report.
        log: where start-up lines go.

    Raises:
        ServingError: the port cannot be bound, or nothing is servable.
        ArtifactError: a missing or corrupt model file (start-up fails before serving anything).
    """
    import uvicorn

    config = config or ServerConfig()
    t0 = time.perf_counter()
    sock = bind_socket(config.host, config.port)
    try:
        if len(refs) == 1 and is_triton_repository(refs[0]):
            if variants:
                raise ServingError("--variant filters a report.json; a Triton repository's models are named "
                                   "<model>-<variant>: use --model")
            repo = load_triton_repository(refs[0], models, config.threads)
        else:
            repo = load_repository(refs, variants, models, config.batching.max_batch_size, config.threads)
        server = InferenceServer(repo, config)
        app = create_app(server)
        port = sock.getsockname()[1]
        by_reason: dict[str, list[str]] = {}
        for s in repo.skipped:
            name, _, why = s.partition(": ")
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            log(f"skipped {', '.join(names)}: {why}")
        b = config.batching
        log(f"loaded {len(repo)} models in {time.perf_counter() - t0:.2f} s: {', '.join(repo.names())}")
        per_model = any(m.batching for m in repo.models.values())
        log(f"dynamic batching {'on' if b.dynamic_batching else 'off'} ("
            + ("max batch and delay per model from config.pbtxt" if per_model else
               f"max batch {b.max_batch_size}, max delay {b.max_queue_delay_ms:g} ms")
            + f", queue {b.max_queue_size}, timeout {b.timeout_s:g} s); "
            f"threads per model {next(iter(repo.models.values())).source.get('threads')}")
        if not is_loopback(config.host):
            log(f"warning: listening on {config.host}, reachable from the network; there is no authentication")
        log(f"serving the Open Inference Protocol at http://{config.host}:{port}/v2 (metrics at /metrics)")
        uvicorn.Server(_uvicorn_config(app, config)).run(sockets=[sock])
    finally:
        sock.close()


class RunningServer:
    """A server running in a background thread (see :func:`start_in_thread`).

    Attributes:
        url: ``http://host:port``; server: the :class:`InferenceServer`; app: the FastAPI app.
    """

    def __init__(self, server: InferenceServer, app, uv, thread: threading.Thread, url: str):
        self.server, self.app, self._uv, self._thread, self.url = server, app, uv, thread, url

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self._uv.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_thread(server: InferenceServer, host: str = "127.0.0.1", port: int = 0,
                    timeout_s: float = 20.0) -> RunningServer:
    """Serve ``server`` from a background thread; returns once ``/v2/health/ready`` would answer 200.

    Args:
        server: an :class:`InferenceServer` over a loaded repository.
        host, port: address (``port=0``: a free port, read back into ``url``).

    Raises:
        ServingError: the port cannot be bound or the server does not start within ``timeout_s``.
    """
    import uvicorn

    sock = bind_socket(host, port)
    app = create_app(server)
    uv = uvicorn.Server(_uvicorn_config(app, server.config))
    th = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="deepship-serve", daemon=True)
    th.start()
    t_end = time.monotonic() + timeout_s
    while not (uv.started and server.ready):
        if not th.is_alive() or time.monotonic() > t_end:
            uv.should_exit = True
            raise ServingError(f"the server did not start on {host}:{sock.getsockname()[1]} within {timeout_s:g} s")
        time.sleep(0.01)
    h, p = sock.getsockname()[:2]
    return RunningServer(server, app, uv, th, f"http://{h}:{p}")
