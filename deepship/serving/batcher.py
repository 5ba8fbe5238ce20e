"""Dynamic batching, after Triton Inference Server's dynamic batcher.

Requests for one model wait in a bounded queue. One worker per model (one model instance, like
Triton's ``instance_group { count: 1 }``) takes the oldest request, adds queued requests with the
same per-sample shapes until the batch holds ``max_batch_size`` samples or the oldest request has
waited ``max_queue_delay_ms``, runs the merged batch (inputs concatenated on axis 0) in its own
thread, and splits the outputs back per request. Requests that arrive while a batch runs wait
for the next one, so batches grow with load even with a delay of 0 (Triton's default).

With ``dynamic_batching=False`` the same queue and worker run every request on its own: the
"batching off" configuration the load test compares against.

**Dynamic padding with length buckets** (``pad_bucket`` > 0, for encoders with an ``attention_mask``,
see :class:`PadSpec`): requests whose sequence lengths fall in the same bucket of ``pad_bucket``
tokens merge even when their lengths differ; the batch is padded with 0 to its longest request (as
sentence-transformers' ``encode`` pads each length-sorted batch to its own longest sentence, and as
Triton's ragged batching lets a backend do), and outputs with a sequence axis are cut back to each
request's length. Without it only requests of equal shapes merge, so real sentence lengths give
batches of one.

Overload is answered, never absorbed: a request finding ``max_queue_size`` requests waiting is
rejected at once with :class:`~deepship.serving.protocol.RequestError` status 503 and a
``Retry-After``; so is a request whose timeout expires before its result is ready (Triton's
``timeout_action: REJECT``). Memory is bounded by ``max_queue_size`` times the body-size limit.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from ..errors import DeepshipError
from ..utils import first_line
from .protocol import RequestError


@dataclass
class BatcherConfig:
    """Dynamic-batcher settings (one set for every model of a server).

    Attributes:
        dynamic_batching: merge queued requests (``False``: run each request alone).
        max_batch_size: most samples per executed batch (models without a batch axis: 1 request).
        max_queue_delay_ms: how long the oldest request may wait for the batch to fill, in ms.
        max_queue_size: most requests waiting per model; more are answered 503.
        timeout_s: default per-request timeout in seconds (queue wait + run); a request's
            ``parameters.timeout`` (microseconds, as in Triton) can only shorten it.
        retry_after_s: the ``Retry-After`` value (seconds) sent with 503 answers.
        pad_bucket: dynamic padding: requests of sequence lengths in the same bucket of this many
            tokens merge, padded to the batch's longest (0: off, only equal shapes merge). Applies to
            models with a :class:`PadSpec`.
    """

    dynamic_batching: bool = True
    max_batch_size: int = 64
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 256
    timeout_s: float = 10.0
    retry_after_s: int = 1
    pad_bucket: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PadSpec:
    """Which tensors of a model carry the sequence axis (axis 1) that dynamic padding pads and cuts.

    Attributes:
        inputs: every input: int arrays ``(batch, seq)``, one of them the ``attention_mask``, so that
            padding with 0 leaves each row's result unchanged.
        outputs: the outputs whose axis 1 is that sequence axis (cut back per request), e.g.
            ``last_hidden_state`` (batch, seq, hidden); the others (``sentence_embedding``) are per row.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...] = ()

    @staticmethod
    def of(inputs: list, outputs: list) -> "PadSpec | None":
        """The spec of a signature (``TensorSpec``-like: ``name``, ``dims``, ``dtype``), or ``None``
        when the model is not an encoder padding can serve: not every input ``(batch, seq)`` with the
        same named ``seq``, an int dtype, and an ``attention_mask``."""
        if not inputs or "attention_mask" not in [t.name for t in inputs]:
            return None
        seqs = {t.dims[1] if len(t.dims) == 2 else None for t in inputs}
        if len(seqs) != 1 or not isinstance(next(iter(seqs)), str) or any("int" not in t.dtype for t in inputs):
            return None
        seq = next(iter(seqs))
        return PadSpec(tuple(t.name for t in inputs),
                       tuple(t.name for t in outputs if len(t.dims) >= 2 and t.dims[1] == seq))


class _Pending:
    __slots__ = ("feeds", "n", "sig", "future", "t_enqueue", "t_start", "timer", "length")

    def __init__(self, feeds, n, sig, future, t_enqueue, length=0):
        self.feeds = feeds
        self.n = n
        self.sig = sig
        self.future = future
        self.t_enqueue = t_enqueue
        self.t_start = 0.0
        self.timer = None
        self.length = length


class DynamicBatcher:
    """The queue and worker of one model.

    Args:
        name: the served model's name (for messages and metrics).
        run: ``run(feeds) -> outputs``; feeds and outputs are dicts of arrays ``(batch, ...)``.
        config: :class:`BatcherConfig`.
        can_batch: ``False`` for a model without a batch axis (requests are never merged).
        observe: optional ``observe(event, **values)`` callback for metrics: ``("batch", size=,
            compute_s=)``, ``("queue", wait_s=)``, ``("depth", depth=)``.
        pad: the model's :class:`PadSpec` (dynamic padding when ``config.pad_bucket`` > 0), or ``None``.

    Use :meth:`start` inside the event loop, :meth:`submit` per request, :meth:`stop` at shutdown.
    """

    def __init__(self, name: str, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 config: BatcherConfig, can_batch: bool = True,
                 observe: Callable[..., None] | None = None, pad: PadSpec | None = None):
        self.name = name
        self.run = run
        self.config = config
        self.can_batch = can_batch and config.dynamic_batching and config.max_batch_size > 1
        self.max_samples = config.max_batch_size if can_batch else 1
        self.pad = pad if (self.can_batch and pad is not None and config.pad_bucket > 0) else None
        self.observe = observe or (lambda event, **kw: None)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{name}"[:30])
        self._stopping = False

    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not counting the batch being run)."""
        return len(self._queue)

    def admit(self) -> None:
        """Raise the 503 a new request would get now (queue full, not started, stopping); the server
        calls it before reading and decoding a body, so overload is shed cheaply.

        Raises:
            RequestError: 503 with ``retry_after_s``.
        """
        if self._stopping or self._wakeup is None:
            raise RequestError(f"model '{self.name}' is not accepting requests (server starting or stopping)", 503,
                               self.config.retry_after_s)
        if len(self._queue) >= self.config.max_queue_size:
            raise RequestError(f"model '{self.name}' is overloaded: {len(self._queue)} requests queued "
                               f"(max_queue_size {self.config.max_queue_size}); retry later", 503,
                               self.config.retry_after_s)

    def start(self) -> None:
        """Start the worker task (call from inside the running event loop)."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the worker; requests still queued are answered 503."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(RequestError("the server is shutting down; retry on another replica", 503,
                                                    self.config.retry_after_s))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, feeds: dict[str, np.ndarray], n: int, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Queue one request and wait for its outputs.

        Args:
            feeds: validated inputs, arrays ``(n, ...)`` (any shape for a model without a batch axis).
            n: samples in the request.
            timeout_s: this request's timeout in seconds (default ``config.timeout_s``; never longer).

        Returns:
            Output name -> array ``(n, ...)`` for this request alone.

        Raises:
            RequestError: 503 (with ``retry_after_s``) when the queue is full, the timeout expires,
                or the server is shutting down; 400/500 when the model rejects or fails the batch.
        """
        self.admit()
        loop = asyncio.get_running_loop()
        timeout = self.config.timeout_s if timeout_s is None else min(timeout_s, self.config.timeout_s)
        length = 0
        if self.pad is not None and all(np.ndim(feeds.get(k)) == 2 for k in self.pad.inputs):
            length = int(feeds[self.pad.inputs[0]].shape[1])
            sig = ("padded", -(-length // self.config.pad_bucket), tuple(sorted(feeds)))
        else:
            sig = tuple((k, v.shape[1:] if self.can_batch else v.shape) for k, v in feeds.items())
        p = _Pending(feeds, n, sig, loop.create_future(), loop.time(), length)
        p.timer = loop.call_later(timeout, self._expire, p, timeout)
        self._queue.append(p)
        self.observe("depth", depth=len(self._queue))
        self._wakeup.set()
        try:
            return await p.future
        finally:
            p.timer.cancel()

    def _expire(self, p: _Pending, timeout: float) -> None:
        if not p.future.done():
            where = "while running" if p.t_start else "in the queue"
            p.future.set_exception(RequestError(f"request to '{self.name}' timed out after {timeout * 1e3:.0f} ms "
                                                f"{where}; retry later or raise the timeout", 503,
                                                self.config.retry_after_s))

    def _take(self, batch: list[_Pending], n: int) -> int:
        """Move queued requests compatible with ``batch[0]`` into ``batch`` while they fit."""
        sig = batch[0].sig
        keep: collections.deque[_Pending] = collections.deque()
        q = self._queue
        while q:
            p = q.popleft()
            if p.future.done():  # timed out or cancelled while queued
                continue
            if n >= self.max_samples:
                keep.append(p)
                keep.extend(q)
                q.clear()
                break
            if p.sig == sig and n + p.n <= self.max_samples:
                batch.append(p)
                n += p.n
            else:
                keep.append(p)
        self._queue = keep
        return n

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.config.max_queue_delay_ms / 1e3
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._queue.popleft()
            if first.future.done():
                continue
            batch = [first]
            n = first.n
            if self.can_batch:
                deadline = first.t_enqueue + delay
                while True:
                    n = self._take(batch, n)
                    rem = deadline - loop.time()
                    if n >= self.max_samples or rem <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), rem)
                    except asyncio.TimeoutError:
                        pass
            self.observe("depth", depth=len(self._queue))
            now = loop.time()
            for p in batch:
                p.t_start = now
                self.observe("queue", wait_s=now - p.t_enqueue)
            try:
                t0 = time.perf_counter()
                results = await loop.run_in_executor(self._executor, self._execute, [p.feeds for p in batch],
                                                     [p.n for p in batch], [p.length for p in batch])
                self.observe("batch", size=n, compute_s=time.perf_counter() - t0)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(RequestError("the server is shutting down; retry later", 503,
                                                            self.config.retry_after_s))
                raise
            except DeepshipError as e:
                err = RequestError(f"model '{self.name}' rejected the batch: {e}", 400)
                results = [err] * len(batch)
            except Exception as e:  # the runtime failed: answer 500 for this batch, keep serving
                msg = first_line(e, 200)
                results = [RequestError(f"model '{self.name}' failed: {type(e).__name__}: {msg}", 500)] * len(batch)
            for p, r in zip(batch, results):
                if p.future.done():
                    continue
                if isinstance(r, Exception):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)

    def _execute(self, feeds_list: list[dict[str, np.ndarray]], counts: list[int],
                 lengths: list[int] | None = None) -> list[dict[str, np.ndarray]]:
        """Merge (padding the sequence axis to the longest request when ``lengths`` differ), run,
        split and cut the padded outputs back (runs in the model's thread; ONNX Runtime releases the GIL)."""
        if len(feeds_list) == 1:
            return [self.run(feeds_list[0])]
        longest = max(lengths or [0])
        if longest and any(n != longest for n in lengths):
            feeds_list = [{k: (np.pad(v, ((0, 0), (0, longest - v.shape[1]))) if k in self.pad.inputs else v)
                           for k, v in f.items()} for f in feeds_list]
        merged = {k: np.concatenate([f[k] for f in feeds_list]) for k in feeds_list[0]}
        out = self.run(merged)
        total = sum(counts)
        res: list[dict[str, np.ndarray]] = [{} for _ in counts]
        for k, v in out.items():
            if np.ndim(v) == 0 or np.shape(v)[0] != total:
                raise RuntimeError(f"output '{k}' has shape {np.shape(v)}, not ({total}, ...): cannot split the batch")
            parts = np.split(v, np.cumsum(counts)[:-1])
            cut = longest and self.pad is not None and k in self.pad.outputs and np.ndim(v) >= 2
            for r, part, n in zip(res, parts, lengths or [0] * len(res)):
                r[k] = part[:, :n] if cut else part
        return res
