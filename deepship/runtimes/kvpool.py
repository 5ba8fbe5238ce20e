"""A bounded pool of KV-cache slots for the fused-attention decoder graph, and a batch-1 runner over it.

The fused graph (:mod:`deepship.exporters.fused`) reads and writes fixed-size cache buffers
``[rows, n_head, context, head_dim]`` in place, with a cache length per row. :class:`KVPool` owns one
such buffer per layer for ``slots`` rows, preallocated once (its memory is fixed: see
:attr:`KVPool.nbytes`), and runs the graph over a contiguous range of rows through ONNX Runtime
IOBinding with each ``present`` output bound to its ``past`` input (the contrib op then skips the copy
of the cache). The buffers are NumPy arrays wrapped by ``OrtValue.ortvalue_from_numpy`` (no copy), so
moving a row to another slot is a NumPy copy of its filled part.

This is the "fixed slots with per-row lengths" design the continuous-batching schedulers of Orca (Yu
et al., OSDI 2022) and vLLM start from; a paged pool (PagedAttention, Kwon et al., SOSP 2023) would
only pay when sequences of very different lengths must share memory, which a 384-token context does
not need (a slot is 1.2 MB for ``gpt``).

:class:`FusedRunner` is a one-slot pool behind the :class:`~deepship.runtimes.kvcache.KVRunner`
interface, so the same graph runs :func:`deepship.runtimes.generate.generate` (the direct loop that
batched answers are checked against) and speculative decoding.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..errors import InputSpecError
from ..models.spec import TensorSpec
from .kvcache import KVLayout, KVRunner
from .session import OrtSession, Session


def is_fused(input_names: Any) -> bool:
    """True for the inputs of a fused-attention decoder graph (:mod:`deepship.exporters.fused`: it takes
    ``seqlens_k``)."""
    return "seqlens_k" in set(input_names)


def fused_graph(session: Any) -> Any:
    """The ONNX Runtime session of the fused-attention graph behind ``session`` (a :class:`FusedSession`'s
    :attr:`~FusedSession.inner`, or ``session`` itself), or ``None`` when it runs another graph."""
    session = getattr(session, "inner", session)
    return session if is_fused(getattr(session, "input_names", ())) else None


class KVPool:
    """``slots`` KV-cache rows for a fused decoder session, each with its own length.

    Args:
        session: an :class:`~deepship.runtimes.session.OrtSession` of a fused graph.
        layout: the decoder's :class:`KVLayout`.
        slots: rows in the pool (>= 1).

    Attributes:
        lengths: int64 ``(slots,)`` cached tokens per row.
        nbytes: bytes of the cache buffers (fixed at creation).

    Raises:
        InputSpecError: ``slots < 1``, or a session that is not a fused-attention graph.
    """

    def __init__(self, session: Any, layout: KVLayout, slots: int):
        if slots < 1:
            raise InputSpecError(f"KV-cache slots {slots} must be >= 1")
        if not isinstance(session, OrtSession) or not is_fused(session.input_names):
            raise InputSpecError("the KV-cache pool needs an ONNX Runtime session of the fused-attention graph "
                                 "(deepship.exporters.fused; the report's fp32-onnx-fused variant)")
        import onnxruntime as ort

        self._ort = ort
        self.session, self.layout, self.slots = session, layout, slots
        shape = (slots, layout.n_head, layout.context, layout.head_dim)
        self.buffers = [np.zeros(shape, np.float32) for _ in range(2 * layout.n_layer)]
        self.nbytes = sum(b.nbytes for b in self.buffers)
        self.lengths = np.zeros(slots, np.int64)
        self._past, self._present = layout.past_names, layout.present_names
        self._bindings: dict[tuple[int, int], Any] = {}
        self.has_adapters = "adapter_ids" in session.input_names

    def _binding(self, lo: int, hi: int):
        """An IOBinding with rows ``lo:hi`` of every buffer bound as past and present (cached)."""
        io = self._bindings.get((lo, hi))
        if io is None:
            io = self.session.sess.io_binding()
            io.bind_output("logits")  # first: get_outputs() follows the binding order
            for name, pname, buf in zip(self._past, self._present, self.buffers):
                v = self._ort.OrtValue.ortvalue_from_numpy(buf[lo:hi])
                io.bind_ortvalue_input(name, v)
                io.bind_ortvalue_output(pname, v)
            self._bindings[(lo, hi)] = io
        return io

    def run(self, lo: int, ids: np.ndarray, adapters: np.ndarray | None = None) -> np.ndarray:
        """Feed int64 ``ids`` ``(rows, seq)`` to rows ``lo .. lo + rows - 1`` after their cached tokens;
        ``adapters``: int64 ``(rows,)``, each row's LoRA adapter index for a graph with adapters
        (:func:`deepship.exporters.fused.add_lora`; default 0, the base model).

        One row with any ``seq`` (a prompt, a prefill chunk, a verification pass), several rows with
        ``seq == 1`` (a decode step), or several empty rows with equal prompts. Their lengths grow by
        ``seq``.

        Returns:
            float32 logits ``(rows, seq, vocab)``.

        Raises:
            InputSpecError: a row would pass the context, or several rows with several tokens.
        """
        rows, seq = ids.shape
        hi = lo + rows
        lens = self.lengths[lo:hi]
        if rows > 1 and seq > 1 and lens.any():
            raise InputSpecError("the fused graph takes several new tokens after a cache for one row at a time "
                                 "(ONNX Runtime's CPU GroupQueryAttention refuses a batch of them); feed rows one by one")
        if int(lens.max()) + seq > self.layout.context:
            raise InputSpecError(f"the KV cache would hold {int(lens.max()) + seq} tokens but the context is "
                                 f"{self.layout.context}; stop generation at the context")
        io = self._binding(lo, hi)
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        io.bind_cpu_input("position_ids", lens[:, None] + np.arange(seq, dtype=np.int64)[None])
        io.bind_cpu_input("seqlens_k", (lens + seq - 1).astype(np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(int(lens.max()) + seq, np.int32))
        if self.has_adapters:
            io.bind_cpu_input("adapter_ids", np.zeros(rows, np.int64) if adapters is None
                              else np.ascontiguousarray(adapters, np.int64))
        io.bind_output("logits")  # unallocated again: its shape follows seq
        self.session.sess.run_with_iobinding(io)
        self.lengths[lo:hi] += seq
        return io.get_outputs()[0].numpy()

    def feed(self, ids: np.ndarray, adapters: np.ndarray | None = None) -> np.ndarray:
        """:meth:`run` over rows ``0 .. rows - 1``, any shape: several rows with several new tokens after
        a cache, which the CPU kernel refuses in one call, are fed row by row."""
        rows, seq = ids.shape
        if rows > 1 and seq > 1 and self.lengths[:rows].any():
            ad = np.zeros(rows, np.int64) if adapters is None else adapters
            return np.concatenate([self.run(i, ids[i:i + 1], ad[i:i + 1]) for i in range(rows)])
        return self.run(0, ids, adapters)

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` (its filled part) to slot ``dst``; ``src`` keeps its data until reused."""
        if src == dst:
            return
        n = int(self.lengths[src])
        for b in self.buffers:
            b[dst, :, :n] = b[src, :, :n]
        self.lengths[dst] = n


class FusedRunner(KVRunner):
    """:class:`~deepship.runtimes.kvcache.KVRunner` over a :class:`KVPool` of the fused graph (with
    ``adapter``: that LoRA adapter's index in a graph with adapters), at batch 1
    (the direct generation loop, speculative decoding's target or draft), or over several rows of
    equal length (several new tokens after a cache then run row by row).

    Raises:
        InputSpecError: as :class:`KVPool`.
    """

    def __init__(self, session: Any, layout: KVLayout, slots: int = 1, adapter: int = 0):
        self.layout, self.adapter = layout, adapter
        self.pool = KVPool(session, layout, slots)

    def reset(self, batch: int) -> None:
        if batch > self.pool.slots:
            self.pool = KVPool(self.pool.session, self.layout, batch)
        self.batch, self.length = batch, 0
        self.pool.lengths[:] = 0

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        self._check(ids)
        logits = self.pool.feed(ids, np.full(ids.shape[0], self.adapter, np.int64))
        self.length += ids.shape[1]
        return logits

    def truncate(self, length: int) -> None:
        # the graph reads each row's first seqlens_k + 1 positions: later ones are overwritten in place
        self.length = length
        self.pool.lengths[: self.batch] = length


def fused_layout(session: Any) -> KVLayout:
    """The :class:`KVLayout` of a fused-attention graph, read from its input and output shapes (the
    cache inputs are ``[batch, n_head, context, head_dim]`` with static heads, context and width).

    Raises:
        InputSpecError: the graph's cache or logits shapes are not static where they must be.
    """
    shapes = {i.name: i.shape for i in session.sess.get_inputs()}
    past = [n for n in session.input_names if n.startswith("past_key_values.")]
    _, h, ctx, d = shapes[past[0]]
    vocab = next(o.shape[-1] for o in session.sess.get_outputs() if o.name == "logits")
    if not all(isinstance(x, int) for x in (h, ctx, d, vocab)):
        raise InputSpecError(f"the fused graph's cache shape {shapes[past[0]]} is not static; export it with "
                             "deepship.exporters.fused.export_fused")
    return KVLayout(n_layer=len(past) // 2, n_head=h, head_dim=d, vocab_size=vocab, context=ctx)


class FusedSession(Session):
    """The fused-attention graph behind the plain decoder interface of
    :mod:`deepship.exporters.kv`: inputs ``input_ids`` int64 ``(batch, seq)`` and
    ``past_key_values.{i}.key/value`` float32 ``(batch, n_head, past, head_dim)`` (``past`` may be 0),
    outputs ``logits`` ``(batch, seq, vocab)`` and ``present.{i}.key/value`` ``(batch, n_head, past + seq,
    head_dim)``. Each call copies the past into a pool and the presents out, so the report's evaluation
    and timing harness run the variant unchanged; generation uses the pool directly
    (:func:`~deepship.runtimes.kvcache.make_runner` gives a :class:`FusedRunner` over :attr:`inner`).

    Args:
        session: an :class:`~deepship.runtimes.session.OrtSession` of a fused graph.
    """

    runtime = "onnxruntime"

    def __init__(self, session: Any):
        self.inner = session
        self.layout = fused_layout(session)
        self.input_names = ["input_ids"] + self.layout.past_names
        self.output_names = ["logits"] + self.layout.present_names
        self.threads, self.provider, self.path = session.threads, session.provider, session.path
        L = self.layout
        self.input_specs = [TensorSpec("input_ids", ("batch", "seq"), "int64", 0, L.vocab_size)] + [
            TensorSpec(n, ("batch", L.n_head, "past", L.head_dim), "float32") for n in L.past_names]
        self.output_specs = [TensorSpec("logits", ("batch", "seq", L.vocab_size), "float32")] + [
            TensorSpec(n, ("batch", L.n_head, "total", L.head_dim), "float32") for n in L.present_names]
        self._pools: dict[int, KVPool] = {}
        self._lock = threading.Lock()  # the pools are shared state: one call at a time (the server's /infer threads)

    #: rows per pool (a larger batch runs in groups, so a pool stays a few tens of MB)
    max_rows = 32

    def run(self, feeds: Any) -> dict[str, np.ndarray]:
        ids = np.ascontiguousarray(feeds["input_ids"], np.int64)
        past = [feeds.get(n) for n in self.layout.past_names]
        p = int(past[0].shape[2]) if past[0] is not None else 0
        with self._lock:
            groups = [self._run(ids[a:a + self.max_rows], [x[a:a + self.max_rows] if p else None for x in past], p)
                      for a in range(0, len(ids), self.max_rows)]
        return {n: np.concatenate([g[j] for g in groups]) for j, n in enumerate(self.output_names)}

    def _run(self, ids: np.ndarray, past: list, p: int) -> list[np.ndarray]:
        b, s = ids.shape
        pool = self._pools.get(b)
        if pool is None:
            pool = self._pools[b] = KVPool(self.inner, self.layout, b)
        if p:
            for buf, a in zip(pool.buffers, past):
                buf[:, :, :p] = a
        pool.lengths[:] = p
        return [pool.feed(ids)] + [buf[:, :, :p + s].copy() for buf in pool.buffers]
