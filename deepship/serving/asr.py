"""Streaming speech recognition over WebSocket for served ASR chunk models (kind ``"streaming-asr"``).

``WS /v2/models/{name}/stream`` (also under ``/versions/1``). One connection = one utterance stream
with its own state (:class:`deepship.runtimes.asr_stream.Stream`: online fbank, attention/convolution
caches, LSTM state). Protocol:

- client -> server, optional first text message: ``{"sample_rate": 16000, "format": "f32le" | "s16le",
  "beam": 0}`` (defaults shown; any rate is resampled to 16 kHz with ``soxr.ResampleStream``, at the
  rate given before the first audio message);
- client -> server, binary messages: mono PCM in that format, any length;
- client -> server, text ``{"event": "end"}``: no more audio; the server flushes and answers the final
  result, then closes the connection (code 1000);
- server -> client, text: ``{"text": "<partial transcript>", "final": false, "chunks": n}`` whenever the
  partial transcript changes, and ``{"text", "final": true, "seconds", "chunks", "rtf"}`` at the end;
  on bad input ``{"error": "<one line>"}`` and close code 1003 (unsupported data) or 1008.

Every chunk of every connection goes through the model's :class:`~deepship.serving.batcher.DynamicBatcher`,
so chunks of concurrent streams that are ready together run as one batch (their states stacked on
axis 0, the sherpa-onnx design). At most ``MAX_STREAMS`` connections per model stream at once; more are
refused with close code 1013 (try again later). Each stream's feature extraction runs in a worker
thread, which waits on the batcher for each chunk.

The feature configuration (fbank, chunk size, mean, tokens) is the zoo ``asr`` model's
(:func:`deepship.models.asr.feature_config`).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from ..runtimes.asr_stream import Stream
from .extensions import register_extension
from .protocol import RequestError
from .repository import ServedModel

#: concurrent streams per model
MAX_STREAMS = 32
class _BatcherModel:
    """``run(feeds)`` for :class:`Stream`, called in a worker thread: submits the chunk to the event
    loop's batcher and waits for its outputs."""

    def __init__(self, batcher: Any, loop: asyncio.AbstractEventLoop):
        self.batcher, self.loop = batcher, loop

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fut = asyncio.run_coroutine_threadsafe(self.batcher.submit(feeds, 1), self.loop)
        return fut.result()


class AsrStreamExtension:
    """The ``asr_stream`` serving extension (see the module docstring)."""

    name = "asr_stream"

    def applies(self, model: ServedModel) -> bool:
        return model.kind == "streaming-asr"

    def install(self, app: FastAPI, server: Any) -> None:
        models = {m.name for m in server.repository.models.values() if self.applies(m)}
        if not models:
            return
        from ..pipeline.arch.asr import stream_config  # heavy (torch): only when an ASR model is served

        fc = stream_config()
        active = {n: 0 for n in models}
        pool = ThreadPoolExecutor(max_workers=MAX_STREAMS * len(models), thread_name_prefix="asr-stream")

        async def stream(ws: WebSocket, name: str, version: str | None = None):
            from ..models.asr.data import To16k  # heavy (torch, through the asr package)

            await ws.accept()
            t0 = time.perf_counter()
            try:
                m = server.model(name, version)
            except RequestError as e:
                await _refuse(ws, str(e), 1008)
                return
            if m.name not in models:
                await _refuse(ws, f"model '{m.name}' is not a streaming ASR chunk model; use /infer for it", 1008)
                return
            if active[m.name] >= MAX_STREAMS:
                server.metrics.request(m.name, 503, 0.0)
                await _refuse(ws, f"model '{m.name}' has {MAX_STREAMS} streams open; retry later", 1013)
                return
            active[m.name] += 1
            loop = asyncio.get_running_loop()
            st = Stream(_BatcherModel(server.batchers[m.name], loop), fc)
            rate, fmt, beam, rs = 16000, "f32le", 0, None
            last = ""
            compute = 0.0
            status = 200
            try:
                while True:
                    msg = await ws.receive()
                    if msg.get("type") == "websocket.disconnect":
                        status = 499
                        return
                    if msg.get("text") is not None:
                        try:
                            ctl = orjson.loads(msg["text"])
                            assert isinstance(ctl, dict)
                        except (orjson.JSONDecodeError, AssertionError):
                            status = 400
                            await _refuse(ws, "text messages are JSON objects: {\"sample_rate\": ...} or {\"event\": \"end\"}", 1003)
                            return
                        if ctl.get("event") == "end":
                            break
                        try:
                            rate = int(ctl.get("sample_rate", rate))
                            fmt = str(ctl.get("format", fmt))
                            beam = int(ctl.get("beam", beam))
                            assert 1000 <= rate <= 384000 and fmt in ("f32le", "s16le") and 0 <= beam <= 64
                        except (TypeError, ValueError, AssertionError):
                            status = 400
                            await _refuse(ws, "bad stream config; sample_rate 1000..384000 Hz, format f32le or s16le, "
                                              "beam 0..64", 1003)
                            return
                        continue
                    data = msg.get("bytes") or b""
                    width = 4 if fmt == "f32le" else 2
                    if len(data) % width:
                        status = 400
                        await _refuse(ws, f"a binary message of {len(data)} bytes is not whole {fmt} samples", 1003)
                        return
                    x = (np.frombuffer(data, "<f4") if fmt == "f32le" else
                         np.frombuffer(data, "<i2").astype(np.float32) / 32768).astype(np.float32)
                    if not np.all(np.isfinite(x)):
                        status = 400
                        await _refuse(ws, "audio holds NaN or infinite samples", 1003)
                        return
                    rs = rs or To16k(rate)  # the rate of the first audio message holds for the stream
                    x = rs(x)
                    c0 = time.perf_counter()
                    await loop.run_in_executor(pool, st.accept_waveform, x, 16000)
                    compute += time.perf_counter() - c0
                    part = st.partial_result()
                    if part != last:
                        last = part
                        await ws.send_text(orjson.dumps({"text": part, "final": False,
                                                         "chunks": len(st.log_probs)}).decode())
                if rs is not None and rs.rs is not None:
                    await loop.run_in_executor(pool, st.accept_waveform, rs.flush(), 16000)
                c0 = time.perf_counter()
                text = await loop.run_in_executor(pool, st.finalize, beam)
                compute += time.perf_counter() - c0
                secs = st.audio_seconds
                await ws.send_text(orjson.dumps({"text": text, "final": True, "seconds": round(secs, 3),
                                                 "chunks": len(st.log_probs),
                                                 "rtf": round(compute / secs, 4) if secs else None}).decode())
                await ws.close(1000)
            except WebSocketDisconnect:
                status = 499
            except Exception as e:  # the model failed: tell the client, keep serving
                status = 500
                await _refuse(ws, f"{type(e).__name__}: {str(e)[:160]}", 1011)
            finally:
                active[m.name] -= 1
                server.metrics.request(m.name, status, time.perf_counter() - t0)

        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.websocket(prefix + "/stream")(stream)


async def _refuse(ws: WebSocket, message: str, code: int) -> None:
    try:
        await ws.send_text(orjson.dumps({"error": message}).decode())
        await ws.close(code)
    except Exception:  # the client is gone already
        pass


register_extension(AsrStreamExtension())
