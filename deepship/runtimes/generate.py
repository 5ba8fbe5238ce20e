"""Autoregressive generation with a KV cache over any :class:`~deepship.runtimes.session.Session`,
and speculative decoding.

**One loop, several cache runners.** :func:`generate` drives a :class:`KVRunner`, which owns the KV
cache of one decoder session whose inputs are ``input_ids`` and ``past_key_values.{i}.key/value`` and
whose outputs are ``logits`` and ``present.{i}.key/value`` (the Optimum / ONNX Runtime GenAI names):

- :class:`ArrayKVRunner` (the default): any session (PyTorch eager or ONNX Runtime); the cache is the
  arrays the last step returned, fed back without a copy (ONNX Runtime wraps numpy inputs and hands
  its outputs over as numpy arrays).
- :class:`IOBindingKVRunner`: ONNX Runtime with IOBinding and preallocated buffers. Every cache tensor
  has two flat buffers sized for the whole context; a step binds the past to one and writes the
  present straight into the other (ping-pong), and the logits into a preallocated buffer, so a step
  allocates nothing and copies nothing outside the graph. On the CPU it measured slower than
  :class:`ArrayKVRunner` for this model size (the ``2 * n_layer + 2`` bind calls per step cost more
  than the allocations they avoid); it is the structure that pays when the cache lives on a GPU.
  In both, the graph's own ``Concat`` of past and new keys/values remains, one copy of the cache per
  layer per step: plain ONNX ops cannot update a tensor in place (ONNX Runtime's
  ``GroupQueryAttention`` contrib op can, with a fixed-size shared buffer, but its CPU kernel rejects
  batch > 1 with several new tokens, which verification and batched prefill need).
- :class:`RecomputeRunner`: no cache; every step runs the whole sequence again (the baseline).

**Sampling** (:class:`Sampling`): greedy, or sampling at a temperature with top-k and/or top-p
(nucleus, Holtzman et al. 2020) filtering; seeded NumPy generator. Stop tokens and a token limit end a
row; the context length ends generation early (``finish_reason == "context"``).

**Speculative decoding** (:func:`speculative_generate`; Leviathan, Kalman, Matias 2023, "Fast Inference
from Transformers via Speculative Decoding", Algorithm 1; Chen et al. 2023, "Accelerating Large
Language Model Decoding with Speculative Sampling"): the draft proposes ``k`` tokens one at a time,
the target scores all of them in one forward pass over ``k + 1`` tokens, and each proposal ``x`` with
draft probability ``q(x)`` and target probability ``p(x)`` is accepted with probability
``min(1, p(x) / q(x))``; at the first rejection a token is drawn from ``norm(max(0, p - q))``; if all
``k`` are accepted one more is drawn from the target's next distribution. The output is distributed
exactly as the target's samples (with the same temperature/top-k/top-p processing applied to both
models). In greedy mode a proposal is accepted iff it is the target's argmax, so the output equals
the target's greedy output. Caches roll back by a length (the runners truncate).

The draft's ``k`` greedy proposals are one ONNX Runtime call (:meth:`ArrayKVRunner.propose`: its
decode graph unrolled ``k`` times with an ``ArgMax`` between copies,
:func:`deepship.exporters.kv.greedy_proposer`); at a 1-layer draft's size the per-call overhead is
a large part of a step.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import InputSpecError
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
        call of the graph unrolled ``k`` times (:func:`deepship.exporters.kv.greedy_proposer`, built
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

                from ..errors import ArtifactError, ExportError
                from ..exporters.kv import greedy_proposer

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
    """A runner for ``session``. ``"auto"`` picks ``"arrays"``: on the CPU, binding 2 x layers + 2 names
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
    if mode == "recompute":
        return RecomputeRunner(prefill_session or session, layout)
    missing = [n for n in ["input_ids"] + layout.past_names if n not in session.input_names]
    missing += [n for n in ["logits"] + layout.present_names if n not in session.output_names]
    if missing:
        raise InputSpecError(f"the decoder session lacks '{missing[0]}'; export it with deepship.exporters.kv "
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


# ---- sampling -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
        greedy: take the argmax (the other fields are ignored).
        temperature: logits are divided by it (> 0).
        top_k: keep the ``top_k`` most likely tokens (``None``: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (nucleus sampling, Holtzman et al. 2020; ``None``: all).
        seed: seed of the NumPy generator.
    """

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def check(self, vocab_size: int) -> None:
        """Raises :class:`InputSpecError` for a temperature <= 0, top-k < 1 or top-p outside (0, 1]."""
        if not self.temperature > 0:
            raise InputSpecError(f"temperature {self.temperature} must be > 0; use --greedy for argmax decoding")
        if self.top_k is not None and not 1 <= self.top_k:
            raise InputSpecError(f"top-k {self.top_k} must be >= 1 (at most the vocabulary, {vocab_size})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputSpecError(f"top-p {self.top_p} must be in (0, 1]")


def probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Next-token distribution after temperature, top-k and top-p, float64 ``(..., vocab)``.

    Greedy sampling gives the one-hot distribution of the argmax.
    """
    x = np.asarray(logits, np.float64)
    if sampling.greedy:
        out = np.zeros_like(x)
        np.put_along_axis(out, x.argmax(-1)[..., None], 1.0, axis=-1)
        return out
    x = x / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < x.shape[-1]:
        kth = np.partition(x, -sampling.top_k, axis=-1)[..., -sampling.top_k][..., None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sp = np.take_along_axis(p, order, -1)
        before = np.cumsum(sp, -1) - sp  # mass of the more likely tokens
        keep_sorted = before < sampling.top_p  # always keeps the most likely token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return p


def sample(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one index per row of probabilities ``(batch, vocab)``; int64 ``(batch,)``."""
    c = np.cumsum(p, -1)
    u = rng.random((p.shape[0], 1)) * c[:, -1:]
    return np.minimum((c <= u).sum(-1), p.shape[-1] - 1).astype(np.int64)


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of logits ``(batch, vocab)``: argmax, or a sample; int64 ``(batch,)``."""
    if sampling.greedy:
        return logits.argmax(-1)
    return sample(probabilities(logits, sampling), rng)


# ---- the loop -----------------------------------------------------------------------------------

@dataclass
class GenerationResult:
    """Output of :func:`generate` / :func:`speculative_generate`.

    Attributes:
        tokens: int64 ``(batch, n)`` new tokens; a row that stopped early is padded with ``-1``.
        lengths: new tokens per row (a stop token is included).
        finish_reasons: per row ``"stop"``, ``"length"`` (token limit) or ``"context"``.
        prefill_ms: time of the prompt's forward pass, milliseconds.
        decode_ms: time of everything after it, milliseconds.
        target_calls: forward passes of the (target) model after prefill (speculative decoding: rounds).
        proposed, accepted: speculative decoding: draft tokens proposed and accepted.
        rejected: speculative decoding: rounds that ended with a rejected proposal.
        k: speculative decoding: draft tokens per round asked for.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finish_reasons: list[str]
    prefill_ms: float
    decode_ms: float
    target_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    rejected: int = 0
    k: int = 0

    @property
    def new_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def tokens_per_s(self) -> float:
        """New tokens (all rows) per second of prefill + decode."""
        t = (self.prefill_ms + self.decode_ms) / 1e3
        return self.new_tokens / t if t > 0 else float("inf")

    @property
    def decode_tok_s(self) -> float:
        """Decode-phase tokens/s over all rows, prefill excluded: each row's tokens after its first
        (the first comes from the prefill), counted up to the shortest row (rows that stopped early
        idle while the others decode)."""
        t = self.decode_ms / 1e3
        return self.tokens.shape[0] * (int(self.lengths.min()) - 1) / t if t > 0 else float("inf")

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens (speculative decoding), else ``None``. Proposals after a
        rejection in the same round count as not accepted, so this falls as ``k`` grows."""
        return self.accepted / self.proposed if self.proposed else None

    @property
    def token_acceptance(self) -> float | None:
        """Estimate of the per-token acceptance probability (``alpha`` of Leviathan et al. 2023):
        accepted / (accepted + rejections), the geometric model's maximum-likelihood estimate."""
        return self.accepted / (self.accepted + self.rejected) if self.accepted + self.rejected else None

    @property
    def tokens_per_round(self) -> float | None:
        """New tokens per target pass (speculative decoding), else ``None``."""
        return self.new_tokens / self.target_calls if self.proposed and self.target_calls else None

    def row(self, i: int = 0) -> np.ndarray:
        return self.tokens[i, : self.lengths[i]]


def check_prompt(prompt: np.ndarray | Sequence[int], layout: KVLayout) -> np.ndarray:
    """Validate prompt token ids; returns int64 ``(batch, seq)``.

    Raises:
        InputSpecError: an empty prompt, rows of different lengths, an id outside the vocabulary, or a
            prompt that fills the context.
    """
    try:
        ids = np.asarray(prompt, dtype=np.int64)
    except (ValueError, TypeError):
        raise InputSpecError("prompts have different token lengths; give prompts of equal length for a batch, "
                             "or generate them one at a time") from None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise InputSpecError(f"prompt token ids have shape {ids.shape}; give (seq,) or (batch, seq)")
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise InputSpecError("the prompt is empty; give at least one token")
    bad = ids[(ids < 0) | (ids >= layout.vocab_size)]
    if bad.size:
        raise InputSpecError(f"unknown token id {int(bad[0])}: the vocabulary has ids 0..{layout.vocab_size - 1}; "
                             "encode the prompt with the model's tokenizer")
    if ids.shape[1] >= layout.context:
        raise InputSpecError(f"the prompt has {ids.shape[1]} tokens but the context is {layout.context}; "
                             f"shorten it to at most {layout.context - 1} tokens")
    return ids


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Raise :class:`InputSpecError` unless the token limit is at least 1."""
    if max_new_tokens < 1:
        raise InputSpecError(f"--max-new-tokens {max_new_tokens} must be >= 1")


def generate(runner: KVRunner, prompt: np.ndarray | Sequence[int], max_new_tokens: int = 64,
             sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (),
             on_tokens: Callable[[np.ndarray], None] | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt``, one forward pass per token.

    Args:
        runner: a :class:`KVRunner` (cache, no cache, torch or ONNX Runtime).
        prompt: int64 ``(seq,)`` or ``(batch, seq)`` token ids (rows of equal length).
        max_new_tokens: token limit per row (>= 1); generation also ends at the context length.
        sampling: greedy, or temperature/top-k/top-p sampling (seeded).
        stop_tokens: ids that end a row (the stop token is kept in the output).
        on_tokens: called after every step with the tokens it committed, int64 ``(batch, 1)``, ``-1``
            for rows that had already ended (token streaming). An exception raised in it ends the
            generation and propagates (e.g. a client that went away).

    Returns:
        :class:`GenerationResult` (timings in ms).

    Raises:
        InputSpecError: bad prompt (empty, unknown ids, longer than the context), bad limits or sampling.
    """
    L = runner.layout
    ids = check_prompt(prompt, L)
    check_max_new_tokens(max_new_tokens)
    sampling.check(L.vocab_size)
    rng = np.random.default_rng(sampling.seed)
    b, plen = ids.shape
    limit = min(max_new_tokens, L.context - plen + 1)
    stops = set(int(t) for t in stop_tokens)
    out = np.full((b, limit), -1, np.int64)
    done = np.zeros(b, bool)
    lengths = np.zeros(b, np.int64)
    reasons = [""] * b
    runner.reset(b)
    t0 = time.perf_counter()
    logits = runner.forward(ids)[:, -1]
    t1 = time.perf_counter()
    calls = 0
    n_done = 0
    for step in range(limit):  # kept lean: at batch 1 the loop's own work is a few % of a decode step
        tok = pick(logits, sampling, rng)
        if n_done:
            live = ~done
            out[live, step] = tok[live]
            lengths[live] += 1
        else:
            out[:, step] = tok
            lengths += 1
        if on_tokens is not None:
            on_tokens(np.where(done, -1, tok)[:, None] if n_done else tok[:, None].copy())
        if stops:
            for i, t in enumerate(tok.tolist()):
                if t in stops and not done[i]:
                    done[i] = True
                    reasons[i] = "stop"
                    n_done += 1
            if n_done:
                tok = np.where(done, 0, tok)
        if n_done == b or step == limit - 1:
            break
        logits = runner.forward(tok[:, None])[:, -1]
        calls += 1
    t2 = time.perf_counter()
    for i in range(b):
        if not reasons[i]:
            reasons[i] = "length" if limit == max_new_tokens else "context"
    return GenerationResult(out, lengths, reasons, (t1 - t0) * 1e3, (t2 - t1) * 1e3, target_calls=calls)


def speculative_generate(target: KVRunner, draft: KVRunner, prompt: np.ndarray | Sequence[int],
                         max_new_tokens: int = 64, k: int = 4, sampling: Sampling = Sampling(),
                         stop_tokens: Sequence[int] = (),
                         on_tokens: Callable[[np.ndarray], None] | None = None) -> GenerationResult:
    """Speculative decoding (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023) at batch 1.

    Each round: the draft proposes ``k`` tokens ``x_1..x_k`` with distributions ``q_1..q_k``; the
    target runs once over ``[last token, x_1..x_k]`` giving ``p_1..p_{k+1}``; ``x_i`` is accepted with
    probability ``min(1, p_i(x_i) / q_i(x_i))`` (greedy: iff ``x_i = argmax p_i``); at the first
    rejection the round ends with a draw from ``norm(max(0, p_i - q_i))`` (greedy: ``argmax p_i``),
    else with a draw from ``p_{k+1}``. Both caches roll back to the accepted tokens. ``k`` shrinks near
    the token limit and the context end.

    Args:
        target, draft: runners of the target and the draft (same vocabulary).
        prompt: int64 ``(seq,)`` or ``(1, seq)`` token ids.
        k: draft tokens per round (>= 1).
        sampling, stop_tokens, max_new_tokens: as in :func:`generate`; the same processing
            (temperature, top-k, top-p) defines ``p`` and ``q``.
        on_tokens: called after every round with the tokens it committed, int64 ``(1, n)``.

    Returns:
        :class:`GenerationResult` with ``proposed``/``accepted`` counts and ``target_calls``.

    Raises:
        InputSpecError: ``k <= 0``, a batch of several prompts, draft and target vocabularies or
            contexts that differ, or a bad prompt/limit/sampling (as :func:`generate`).
    """
    if int(k) != k or k <= 0:
        raise InputSpecError(f"--k {k} must be a positive integer (draft tokens proposed per round)")
    T, D = target.layout, draft.layout
    if T.vocab_size != D.vocab_size:
        raise InputSpecError(f"draft vocabulary ({D.vocab_size} tokens) differs from the target's ({T.vocab_size}); "
                             "use a draft trained with the target's tokenizer")
    ids = check_prompt(prompt, T)
    if ids.shape[0] != 1:
        raise InputSpecError(f"speculative decoding runs one prompt at a time; got a batch of {ids.shape[0]}")
    if ids.shape[1] >= D.context:
        raise InputSpecError(f"the prompt has {ids.shape[1]} tokens but the draft's context is {D.context}")
    check_max_new_tokens(max_new_tokens)
    sampling.check(T.vocab_size)
    rng = np.random.default_rng(sampling.seed)
    context = min(T.context, D.context)
    plen = ids.shape[1]
    limit = min(max_new_tokens, context - plen + 1)
    stops = set(int(s) for s in stop_tokens)
    seq = [int(x) for x in ids[0]]
    target.reset(1)
    draft.reset(1)
    t0 = time.perf_counter()
    if plen > 1:  # the last prompt token stays pending: it opens the first verification pass
        target.forward(ids[:, :-1])
        draft.forward(ids[:, :-1])
    t1 = time.perf_counter()
    new: list[int] = []
    proposed = accepted = calls = rejected = 0
    reason = ""
    while len(new) < limit and not reason:
        pending = seq[target.length:]  # committed tokens the target has not seen (1 after round 1)
        room = context - target.length - len(pending)
        kk = max(0, min(int(k), limit - len(new) - 1, room))
        # draft: propose kk tokens
        props, qs = draft.propose(np.asarray([seq[draft.length:]], np.int64), kk, sampling, rng) if kk else ([], [])
        # target: verify all proposals in one pass (logits for the pending token and each proposal)
        base = target.length + len(pending)
        tl = target.forward(np.asarray([pending + props], np.int64))[0, len(pending) - 1:]
        calls += 1
        n_ok = 0
        extra = None
        if sampling.greedy:  # accept while the proposal is the target's argmax
            best = tl.argmax(-1)
            while n_ok < len(props) and int(best[n_ok]) == props[n_ok]:
                n_ok += 1
            extra = int(best[n_ok])
        else:
            ps = probabilities(tl, sampling)
            for i, x in enumerate(props):
                p, q = ps[i], qs[i]
                if rng.random() < min(1.0, p[x] / q[x]):
                    n_ok += 1
                    continue
                r = np.maximum(p - q, 0.0)  # rejected: draw from norm(max(0, p - q))
                extra = int(sample((r / r.sum() if r.sum() > 0 else p)[None], rng)[0])
                break
            if extra is None:  # all accepted: one more token from the target
                extra = int(sample(ps[len(props)][None], rng)[0])
        proposed += len(props)
        accepted += n_ok
        rejected += int(n_ok < len(props))
        round_tokens = props[:n_ok] + [extra]
        # roll back both caches to the committed tokens
        target.truncate(base + n_ok)
        draft.truncate(min(draft.length, base + n_ok))
        n_before = len(new)
        for x in round_tokens:
            if len(new) >= limit:
                break
            new.append(x)
            seq.append(x)
            if x in stops:
                reason = "stop"
                break
        if on_tokens is not None and len(new) > n_before:
            on_tokens(np.asarray([new[n_before:]], np.int64))
    t2 = time.perf_counter()
    if not reason:
        reason = "length" if limit == max_new_tokens else "context"
    out = np.asarray([new], np.int64)
    return GenerationResult(out, np.asarray([len(new)]), [reason], (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                            target_calls=calls, proposed=proposed, accepted=accepted, rejected=rejected, k=int(k))
