"""Continuous (iteration-level) batching of decode steps over a bounded KV-cache pool.

One :class:`DecodeScheduler` per served fused-attention decoder runs one loop in its own thread, as
Orca's iteration-level scheduler (Yu et al., OSDI 2022) and vLLM's do:

1. **Admission**: a request takes a free slot of the :class:`~deepship.runtimes.kvpool.KVPool`; with no
   free slot it waits in a FIFO queue of at most ``max_queue`` requests; beyond that
   :meth:`DecodeScheduler.submit` raises :class:`PoolFull` (the server answers 503 with Retry-After).
   The pool is allocated once, so memory does not grow with load.
2. **Chunked prefill** (Sarathi, Agrawal et al. 2023): each iteration feeds at most ``chunk`` prompt
   tokens in all (a token budget), one row at a time in place into its slot: the rest of a long
   prompt, or several short ones in turn; so a long prompt delays the running batch by one chunk per
   step, not by its whole prefill. When its prompt is in, a request samples its first token (time to
   first token) and joins the batch at the next step.
3. **One decode step** for every running row at once (``(rows, 1)`` tokens, each row at its own
   length), then per-row sampling with each request's own parameters and seeded generator (greedy
   and sampled requests mix), streaming callbacks, and stop checks. Finished or cancelled rows leave
   at once: the last running row moves into the freed slot, so running rows stay ``0 .. n - 1`` and a
   step is one contiguous call.

Rows decode exactly as :func:`deepship.runtimes.generate.generate` does over the same graph at batch 1
(same sampling calls, same stop and limit rules), so a greedy answer is the direct loop's, token for
token (checked by the tests and by benchmarks/serving_llm.py).

Speculative decoding does not run inside the batch: a speculative request runs alone on its own
runner beside it (see :mod:`deepship.serving.generate`), since in a batch every row would wait for
the slowest row's draft and verification, and at 32 rows the batch already keeps the cores busy.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import DeepshipError
from ..runtimes.generate import GenerationResult
from ..runtimes.kvcache import KVLayout
from ..runtimes.kvpool import KVPool
from ..runtimes.sampling import Sampling, pick

#: prompt tokens fed per scheduler iteration (measured: 128-token chunks prefill a 383-token prompt
#: faster than one pass, docs/serving.md)
PREFILL_CHUNK = 128


class PoolFull(DeepshipError):
    """Every KV-cache slot is taken and the wait queue is full."""


class Cancelled(DeepshipError):
    """The request was cancelled (its client went away) before it finished."""


@dataclass
class GenRequest:
    """One generation request inside the scheduler.

    Attributes:
        ids: int64 ``(seq,)`` prompt.
        max_tokens: new-token limit (>= 1); generation also ends at the context.
        sampling: its :class:`~deepship.runtimes.sampling.Sampling` (seeded per request).
        stop_ids: token ids that end it (kept in the output).
        on_tokens: called in the scheduler thread with int64 ``(1, 1)`` after each new token; an
            exception raised in it cancels the request.
        adapter: the LoRA adapter's index in a graph with adapters (0: the base model).
        future: resolved with a :class:`~deepship.runtimes.generate.GenerationResult` (batch 1), or
            failed with :class:`Cancelled` or the error that ended it.
    """

    ids: np.ndarray
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: frozenset = frozenset()
    on_tokens: Callable[[np.ndarray], None] | None = None
    adapter: int = 0
    future: Future = field(default_factory=Future)
    # scheduler state
    cancelled: bool = False
    fed: int = 0
    out: list = field(default_factory=list)
    reason: str = ""
    t_submit: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0
    limit: int = 0
    rng: Any = None

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next iteration (its slot is freed)."""
        self.cancelled = True


class DecodeScheduler:
    """The continuous-batching loop of one decoder (see the module docstring).

    Args:
        session: an ONNX Runtime session of the fused-attention graph (:mod:`deepship.exporters.fused`).
        layout: the decoder's :class:`~deepship.runtimes.kvcache.KVLayout`.
        slots: KV-cache rows, i.e. requests decoding at once (>= 1).
        max_queue: requests that may wait for a slot (>= 0).
        chunk: prompt tokens fed per iteration (>= 1).
        observe: ``observe(event, **values)`` for metrics: ``"ttft"`` (``seconds``), ``"itl"``
            (``seconds``), ``"step"`` (``rows``, ``seconds``), ``"occupancy"`` (``slots_in_use``,
            ``queue``).

    Raises:
        InputSpecError: as :class:`~deepship.runtimes.kvpool.KVPool`; ``chunk < 1`` or ``max_queue < 0``.
    """

    def __init__(self, session: Any, layout: KVLayout, slots: int = 32, max_queue: int = 64,
                 chunk: int = PREFILL_CHUNK, observe: Callable[..., None] | None = None, name: str = "decoder"):
        from ..errors import InputSpecError

        if chunk < 1 or max_queue < 0:
            raise InputSpecError(f"prefill chunk {chunk} must be >= 1 and the queue {max_queue} >= 0")
        self.pool = KVPool(session, layout, slots)
        # warm-up: every shape a call can have (decode steps of 1..slots rows, prefill chunks of 1..chunk
        # tokens), so no request pays ONNX Runtime's first run of a shape (measured: about 3 ms each)
        for n in range(1, slots + 1):
            self.pool.run(0, np.zeros((n, 1), np.int64))
            self.pool.lengths[:] = 0
        for t in range(2, min(chunk, layout.context) + 1):
            self.pool.run(0, np.zeros((1, t), np.int64))
            self.pool.lengths[:] = 0
        self.layout, self.slots, self.max_queue, self.chunk = layout, slots, max_queue, chunk
        self.observe = observe or (lambda event, **kw: None)
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.running: list[GenRequest] = []   # row i of the pool is running[i]
        self.prefilling: GenRequest | None = None  # at row len(running)
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name=f"decode-scheduler-{name}", daemon=True)
        self._thread.start()

    # ---- client side -----------------------------------------------------------------------------

    @property
    def in_use(self) -> int:
        """Slots holding a request (running or being prefilled)."""
        return len(self.running) + (self.prefilling is not None)

    def submit(self, req: GenRequest) -> Future:
        """Queue ``req``; returns its future.

        Raises:
            PoolFull: every slot is taken and ``max_queue`` requests already wait.
        """
        with self._cv:
            if self._closed:
                raise PoolFull("the decoder is shutting down; retry on another replica")
            if self.in_use + len(self.waiting) >= self.slots + self.max_queue:
                raise PoolFull(f"all {self.slots} KV-cache slots are in use and {len(self.waiting)} requests wait; "
                               "retry later")
            req.t_submit = time.perf_counter()
            req.limit = min(req.max_tokens, self.layout.context - len(req.ids) + 1)
            req.rng = np.random.default_rng(req.sampling.seed)
            self.waiting.append(req)
            self._cv.notify()
        return req.future

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop; requests still queued or running fail with :class:`Cancelled`."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not (self.waiting or self.running or self.prefilling):
                    self.observe("occupancy", slots_in_use=0, queue=0)  # idle
                while not self._closed and not (self.waiting or self.running or self.prefilling):
                    self._cv.wait()
                if self._closed:
                    break
                self._admit()
                self.observe("occupancy", slots_in_use=self.in_use, queue=len(self.waiting))
            try:
                self._iteration()
            except Exception as e:  # a failed run fails the requests in it, never the loop
                for r in self.running + ([self.prefilling] if self.prefilling else []):
                    _fail(r, e)
                self.running, self.prefilling = [], None
        with self._cv:
            for r in list(self.waiting) + self.running + ([self.prefilling] if self.prefilling else []):
                _fail(r, Cancelled("the decoder shut down"))
            self.waiting.clear()
            self.running, self.prefilling = [], None

    def _admit(self) -> None:
        """The next waiting request takes the slot after the running rows, if one is free (hold ``_cv``)."""
        if self.prefilling is None and self.waiting and self.in_use < self.slots:
            self.prefilling = self.waiting.popleft()
            self.pool.lengths[len(self.running)] = 0

    def _prefill(self) -> None:
        """Feed up to ``chunk`` prompt tokens in all, to the request being admitted and, when its prompt
        is in, to the next ones (Sarathi's token budget per step)."""
        budget = self.chunk
        while budget > 0 and (r := self.prefilling) is not None:
            if r.cancelled:
                self.prefilling = None
                _fail(r, Cancelled("cancelled"))
            else:
                part = r.ids[r.fed: r.fed + budget]
                logits = self.pool.run(len(self.running), part[None], np.array([r.adapter], np.int64))
                r.fed += len(part)
                budget -= len(part)
                if r.fed < len(r.ids):
                    return
                now = time.perf_counter()  # prompt in: first token, then it joins the batch
                r.t_first = r.t_last = now
                self.observe("ttft", seconds=now - r.t_submit)
                if self._emit(r, int(pick(logits[:, -1], r.sampling, r.rng)[0]), now):
                    self.running.append(r)  # its row, len(running), is where it was prefilled
                self.prefilling = None  # after: it holds its slot all along (admission counts it)
            with self._cv:
                self._admit()

    def _iteration(self) -> None:
        self._prefill()
        gone = [i for i, q in enumerate(self.running) if q.cancelled]
        if gone:
            self._leave(gone, Cancelled("cancelled"))
        if not self.running:
            return
        t0 = time.perf_counter()
        toks = np.array([[q.out[-1]] for q in self.running], np.int64)
        logits = self.pool.run(0, toks, np.array([q.adapter for q in self.running], np.int64))[:, -1]
        now = time.perf_counter()
        self.steps += 1
        self.observe("step", rows=len(self.running), seconds=now - t0)
        greedy = [i for i, q in enumerate(self.running) if q.sampling.greedy]
        nxt = np.empty(len(self.running), np.int64)
        if greedy:
            nxt[greedy] = logits[greedy].argmax(-1)
        for i, q in enumerate(self.running):
            if not q.sampling.greedy:
                nxt[i] = pick(logits[i:i + 1], q.sampling, q.rng)[0]
        done = [i for i, q in enumerate(self.running) if not self._emit(q, int(nxt[i]), now)]
        if done:
            self._leave(done, None)

    def _emit(self, r: GenRequest, tok: int, now: float) -> bool:
        """Commit ``tok`` to ``r``; False when ``r`` has finished (resolved) or failed."""
        r.out.append(tok)
        if len(r.out) > 1:
            self.observe("itl", seconds=now - r.t_last)
        r.t_last = now
        if r.on_tokens is not None:
            try:
                r.on_tokens(np.array([[tok]], np.int64))
            except Exception as e:
                _fail(r, e)
                return False
        if tok in r.stop_ids:
            r.reason = "stop"
        elif len(r.out) >= r.limit:
            r.reason = "length" if r.limit == r.max_tokens else "context"
        if not r.reason:
            return True
        n = len(r.out)
        res = GenerationResult(np.asarray([r.out], np.int64), np.array([n]), [r.reason],
                               (r.t_first - r.t_submit) * 1e3, (now - r.t_first) * 1e3, target_calls=n - 1)
        if not r.future.done():
            r.future.set_result(res)
        return False

    def _leave(self, rows: list[int], error: Exception | None) -> None:
        """Free the slots of running ``rows`` (resolved already unless ``error``): each freed slot takes
        the last running row, and a prompt being prefilled moves down to stay right after them."""
        for i in sorted(rows, reverse=True):
            if error is not None:
                _fail(self.running[i], error)
            last = len(self.running) - 1
            self.pool.move(last, i)
            self.running[i] = self.running[last]
            self.running.pop()
            if self.prefilling is not None:
                self.pool.move(last + 1, last)


def _fail(r: GenRequest, e: Exception) -> None:
    if not r.future.done():
        r.future.set_exception(e)
