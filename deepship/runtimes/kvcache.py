"""KV-cache runners: one decoder session and the cache it carries, behind one interface.

- :class:`ArrayKVRunner` (the default): any session (PyTorch eager or ONNX Runtime); the cache is the
  arrays the last step returned, fed back without a copy; greedy draft proposals run as one call of
  the decode graph unrolled ``k`` times (:func:`deepship.runtimes.proposer.greedy_proposer`).
- :class:`IOBindingKVRunner`: ONNX Runtime with IOBinding and preallocated ping-pong buffers (the
  structure that pays when the cache lives on a GPU; slower on this CPU, docs/gpt.md).
- :class:`RecomputeRunner`: no cache; every step runs the whole sequence again (the baseline).

The generation loops over them are in :mod:`deepship.runtimes.generate`.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ArtifactError, ExportError, InputSpecError
from .proposer import greedy_proposer
from .sampling import Sampling, probabilities, sample
from .session import OrtSession, Session


@dataclass(frozen=True)
class KVLayout:
    """Shape of a decoder's KV cache and vocabulary.

    Attributes:
        n_layer: layers (each has a key and a value cache).
        n_head: attention heads of the cache.
        head_dim: per-head width.
        vocab_size: logits per position.
        context: maximum tokens in the cache plus new tokens (the position-embedding length).
    """

    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int
    context: int

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]

    @classmethod
    def of(cls, cfg: Any) -> "KVLayout":
        """The layout of a decoder config with ``n_layer``, ``n_head``, ``head_dim``, ``vocab_size`` and
        ``context`` (e.g. :class:`deepship.models.gpt.GPTConfig`)."""
        return cls(n_layer=cfg.n_layer, n_head=cfg.n_head, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                   context=cfg.context)

    def cache_bytes(self, batch: int, length: int, itemsize: int = 4) -> int:
        """Bytes of the whole KV cache (all layers, keys and values) at ``length`` tokens."""
        return 2 * self.n_layer * batch * self.n_head * length * self.head_dim * itemsize


# ---- cache runners ------------------------------------------------------------------------------

class KVRunner:
    """Runs a decoder and owns its KV cache.

    Attributes:
        layout: the :class:`KVLayout`.
        length: tokens in the cache.
        batch: rows in the cache.
    """

    layout: KVLayout
    length: int = 0
    batch: int = 0

    def reset(self, batch: int) -> None:
        """Empty the cache for ``batch`` rows."""
        raise NotImplementedError

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Feed int64 ``(batch, seq)`` new tokens after the cache; return float32 logits
        ``(batch, seq, vocab)`` (valid until the next call) and append the tokens to the cache.

        Raises:
            InputSpecError: the cache would exceed the context.
        """
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached tokens (rollback after rejected proposals)."""
        raise NotImplementedError

    def propose(self, ids: np.ndarray, k: int, sampling: "Sampling", rng: np.random.Generator
                ) -> tuple[list[int], list[np.ndarray]]:
        """The draft's side of a speculative round at batch 1: feed int64 ``(1, seq)`` ``ids``, then
        choose ``k`` tokens one at a time, each fed back except the last.

        Returns:
            ``(tokens, qs)``: the ``k`` token ids and, when sampling, the float64 ``(vocab,)``
            distribution each was drawn from (empty when greedy). The cache then holds ``ids`` and
            the first ``k - 1`` tokens.
        """
        tokens: list[int] = []
        qs: list[np.ndarray] = []
        dl = self.forward(ids)[0, -1]
        for i in range(k):
            if sampling.greedy:
                x = int(dl.argmax())
            else:
                q = probabilities(dl, sampling)
                x = int(sample(q[None], rng)[0])
                qs.append(q)
            tokens.append(x)
            if i < k - 1:
                dl = self.forward(np.asarray([[x]], np.int64))[0, -1]
        return tokens, qs

    def _check(self, ids: np.ndarray, extra: int = 0) -> None:
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise InputSpecError(f"token ids have shape {ids.shape}; expected ({self.batch}, seq) after reset({self.batch})")
        if self.length + ids.shape[1] + extra > self.layout.context:
            raise InputSpecError(f"{self.length} cached + {ids.shape[1] + extra} new tokens exceed the context of "
                                 f"{self.layout.context}; shorten the prompt or lower --max-new-tokens")


#: fused greedy proposal sessions per decode session and k (see ArrayKVRunner.propose)
_PROPOSERS: "weakref.WeakKeyDictionary[Session, dict[int, OrtSession | None]]" = weakref.WeakKeyDictionary()


class ArrayKVRunner(KVRunner):
    """KV cache as numpy arrays through ``Session.run`` (works for torch and ONNX Runtime sessions).

    Args:
        session: decode-step session (inputs ``input_ids`` + ``past_key_values.*``).
        layout: its :class:`KVLayout`.
        prefill_session: optional session without past inputs, used while the cache is empty.
        fuse_proposals: greedy :meth:`propose` runs one unrolled graph instead of ``k`` steps (ONNX
            Runtime sessions; ``False`` keeps the step loop, for comparison).
    """

    def __init__(self, session: Session, layout: KVLayout, prefill_session: Session | None = None,
                 fuse_proposals: bool = True):
        self.session, self.layout, self.prefill_session = session, layout, prefill_session
        self.fuse_proposals = fuse_proposals
        self.cache: list[np.ndarray] = []
        # ONNX Runtime: call the InferenceSession directly (the checks of OrtSession.run cost ~10% of a
        # decode step of a small model); the feeds are built here with the right names and dtypes
        self._ort = session.sess if isinstance(session, OrtSession) else None
        self._ort_prefill = prefill_session.sess if isinstance(prefill_session, OrtSession) else None
        self._outputs = ["logits"] + layout.present_names
        self._proposers = _PROPOSERS.setdefault(session, {}) if self._ort is not None else {}
        self._proposer_outputs = ["tokens"] + layout.present_names

    def reset(self, batch: int) -> None:
        self.batch, self.length = batch, 0
        L = self.layout
        self.cache = [np.zeros((batch, L.n_head, 0, L.head_dim), np.float32) for _ in L.past_names]

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._check(ids)
        if self.length == 0 and self.prefill_session is not None:
            feeds, sess, run = {"input_ids": ids}, self._ort_prefill, self.prefill_session
        else:
            feeds = {"input_ids": ids, **dict(zip(self.layout.past_names, self.cache))}
            sess, run = self._ort, self.session
        if sess is not None:
            logits, *self.cache = sess.run(self._outputs, feeds)
        else:
            out = run.run(feeds)
            logits, self.cache = out["logits"], [out[n] for n in self.layout.present_names]
        self.length += ids.shape[1]
        return logits

    def truncate(self, length: int) -> None:
        if length < self.length:
            self.cache = [np.ascontiguousarray(c[:, :, :length]) for c in self.cache]
            self.length = length

    def propose(self, ids: np.ndarray, k: int, sampling: "Sampling", rng: np.random.Generator
                ) -> tuple[list[int], list[np.ndarray]]:
        """As :meth:`KVRunner.propose`; greedy proposals from an ONNX Runtime decode graph run as one
        call of the graph unrolled ``k`` times (:func:`deepship.runtimes.proposer.greedy_proposer`, built
        on first use for each ``k`` and kept), which saves ``k - 1`` calls' overhead."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        room = self.layout.context - self.length - ids.shape[1] + 1  # the most proposals the cache can take
        # a graph built for a larger k serves a smaller one (the last round of a generation) and is
        # cut back: a few extra draft steps cost less than building a session
        built = [j for j, p in self._proposers.items() if p is not None and k <= j <= room]
        kk = min(built) if built else k
        sess = self._proposer(kk) if self.fuse_proposals and sampling.greedy and k > 1 and kk <= room else None
        if sess is None:
            return super().propose(ids, k, sampling, rng)
        self._check(ids, extra=kk - 1)
        start = self.length
        tokens, *self.cache = sess.run(self._proposer_outputs, {"input_ids": ids, **dict(zip(self.layout.past_names, self.cache))})
        self.length += ids.shape[1] + kk - 1
        self.truncate(start + ids.shape[1] + k - 1)
        return [int(x) for x in tokens[0, :k]], []

    def _proposer(self, k: int) -> OrtSession | None:
        """The fused greedy proposal session for ``k`` (``None`` for torch sessions or a graph that
        cannot be unrolled; :meth:`propose` then calls the step graph ``k`` times). Kept per decode
        session, so every runner of a served draft shares them (ONNX Runtime sessions may be called
        from several threads)."""
        if k not in self._proposers:
            sess = None
            if self._ort is not None and getattr(self.session, "path", None):
                import onnx

                try:
                    model = greedy_proposer(onnx.load(self.session.path, load_external_data=False), k)
                    sess = OrtSession(self.session.path, providers=self._ort.get_providers(),
                                      threads=self.session.threads, model=model)
                except (ExportError, ArtifactError):  # not unrollable / not loadable: the step loop serves
                    sess = None
            self._proposers[k] = sess
        return self._proposers[k].sess if self._proposers[k] is not None else None


class IOBindingKVRunner(KVRunner):
    """ONNX Runtime IOBinding with preallocated ping-pong KV buffers (see the module docstring).

    Args:
        session: an :class:`~deepship.runtimes.session.OrtSession` of the decode-step graph.
        layout: its :class:`KVLayout`.
        prefill_session: optional OrtSession of the prefill graph (no past inputs).
    """

    def __init__(self, session: OrtSession, layout: KVLayout, prefill_session: OrtSession | None = None):
        self.sess = session.sess
        self.prefill = prefill_session.sess if prefill_session is not None else None
        self.layout = layout
        self.capacity_batch = 0
        self.io = self.sess.io_binding()
        self.io_prefill = self.prefill.io_binding() if self.prefill is not None else None

    def reset(self, batch: int) -> None:
        L = self.layout
        if batch > self.capacity_batch:  # (re)allocate for this batch; reused across calls otherwise
            n = batch * L.n_head * L.context * L.head_dim
            self.bufs = [[np.empty(n, np.float32), np.empty(n, np.float32)] for _ in L.past_names]
            self.logits_buf = np.empty(batch * L.context * L.vocab_size, np.float32)
            self.capacity_batch = batch
        self.batch, self.length, self.cur = batch, 0, 0

    def _view(self, j: int, which: int, length: int) -> np.ndarray:
        L = self.layout
        return self.bufs[j][which][: self.batch * L.n_head * length * L.head_dim].reshape(
            self.batch, L.n_head, length, L.head_dim)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._check(ids)
        L, b, s = self.layout, self.batch, ids.shape[1]
        p, t = self.length, self.length + s
        use_prefill = p == 0 and self.prefill is not None
        io, sess = (self.io_prefill, self.prefill) if use_prefill else (self.io, self.sess)
        io.bind_cpu_input("input_ids", ids)
        if not use_prefill:
            for j, name in enumerate(L.past_names):
                io.bind_input(name, "cpu", 0, np.float32, [b, L.n_head, p, L.head_dim], self.bufs[j][self.cur].ctypes.data)
        nxt = 1 - self.cur
        for j, name in enumerate(L.present_names):
            io.bind_output(name, "cpu", 0, np.float32, [b, L.n_head, t, L.head_dim], self.bufs[j][nxt].ctypes.data)
        io.bind_output("logits", "cpu", 0, np.float32, [b, s, L.vocab_size], self.logits_buf.ctypes.data)
        sess.run_with_iobinding(io)
        self.cur, self.length = nxt, t
        return self.logits_buf[: b * s * L.vocab_size].reshape(b, s, L.vocab_size)

    def truncate(self, length: int) -> None:
        if length >= self.length:
            return
        nxt = 1 - self.cur
        for j in range(len(self.bufs)):
            np.copyto(self._view(j, nxt, length), self._view(j, self.cur, self.length)[:, :, :length])
        self.cur, self.length = nxt, length


class RecomputeRunner(KVRunner):
    """No cache: every call runs the whole token history through the model (the no-cache baseline).

    Args:
        session: a session taking ``input_ids`` (and optionally ``past_key_values.*``, fed empty).
        layout: its :class:`KVLayout`.
    """

    def __init__(self, session: Session, layout: KVLayout):
        self.session, self.layout = session, layout
        self.need_past = any(n.startswith("past_key_values.") for n in session.input_names)

    def reset(self, batch: int) -> None:
        self.batch, self.length = batch, 0
        self.history = np.zeros((batch, 0), np.int64)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._check(ids)
        self.history = np.concatenate([self.history, ids], axis=1)
        feeds = {"input_ids": self.history}
        if self.need_past:
            L = self.layout
            feeds.update({n: np.zeros((self.batch, L.n_head, 0, L.head_dim), np.float32) for n in L.past_names})
        self.length = self.history.shape[1]
        return self.session.run(feeds)["logits"][:, -ids.shape[1]:]

    def truncate(self, length: int) -> None:
        if length < self.length:
            self.history = self.history[:, :length]
            self.length = length


def make_runner(session: Session, layout: KVLayout, prefill_session: Session | None = None,
                mode: str = "auto") -> KVRunner:
    """A runner for ``session``. A fused-attention graph (:mod:`deepship.exporters.fused`) gets a
    :class:`~deepship.runtimes.kvpool.FusedRunner` whatever the mode. Else ``"auto"`` picks ``"arrays"``: on the CPU, binding 2 x layers + 2 names
    per step through the Python IOBinding API costs more than it saves (about 0.5 against 0.37 ms per
    decode step of ``gpt`` at batch 1; see docs/gpt.md), since ``InferenceSession.run`` already feeds
    numpy arrays without a copy and returns its outputs without one. ``"iobinding"`` keeps the
    preallocated-buffer runner (it pays where outputs would otherwise cross a device boundary).

    Args:
        mode: ``"auto"``, ``"iobinding"``, ``"arrays"`` or ``"recompute"``.

    Raises:
        InputSpecError: an unknown mode, IOBinding on a non-ONNX Runtime session, or a session whose
            inputs/outputs do not follow the KV-cache names.
    """
    from .kvpool import FusedRunner, fused_graph

    fused = fused_graph(session)
    if fused is not None:  # the fused-attention graph updates its cache in place: one runner fits
        return FusedRunner(fused, layout)
    if mode == "recompute":
        return RecomputeRunner(prefill_session or session, layout)
    missing = [n for n in ["input_ids"] + layout.past_names if n not in session.input_names]
    missing += [n for n in ["logits"] + layout.present_names if n not in session.output_names]
    if missing:
        raise InputSpecError(f"the decoder session lacks '{missing[0]}'; export it with deepship.exporters.kv.export_kv "
                             "(inputs input_ids + past_key_values.{i}.key/value, outputs logits + present.{i}.key/value)")
    if mode == "auto":  # measured: on the CPU the per-step bind calls cost more than the copies they save
        mode = "arrays"
    if mode == "iobinding":
        if not isinstance(session, OrtSession) or (prefill_session is not None and not isinstance(prefill_session, OrtSession)):
            raise InputSpecError("IOBinding needs ONNX Runtime sessions; use mode 'arrays' for torch")
        return IOBindingKVRunner(session, layout, prefill_session)
    if mode == "arrays":
        return ArrayKVRunner(session, layout, prefill_session)
    raise InputSpecError(f"unknown runner mode '{mode}'; use auto, iobinding, arrays or recompute")
