"""Autoregressive generation with a KV cache over any :class:`~deepship.runtimes.session.Session`,
and speculative decoding.

**One loop, several cache runners.** :func:`generate` drives a :class:`~deepship.runtimes.kvcache.KVRunner`
(:mod:`deepship.runtimes.kvcache`), which owns the KV
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
  layer per step: plain ONNX ops cannot update a tensor in place.
- :class:`~deepship.runtimes.kvpool.FusedRunner`: the fused-attention graph
  (:mod:`deepship.exporters.fused`, ONNX Runtime's ``GroupQueryAttention`` with a fixed-size cache
  updated in place); :func:`~deepship.runtimes.kvcache.make_runner` picks it for that graph. Its CPU
  kernel refuses several rows with several new tokens after a cache; those run row by row.
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
:func:`deepship.runtimes.proposer.greedy_proposer`); at a 1-layer draft's size the per-call overhead is
a large part of a step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import InputSpecError
from .kvcache import KVLayout, KVRunner
from .sampling import Sampling, pick, probabilities, sample


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


def check_max_new_tokens(max_new_tokens: int, name: str = "--max-new-tokens") -> None:
    """Raise :class:`InputSpecError` unless the token limit is an integer of at least 1; ``name`` is
    what the caller calls it (the CLI flag, or ``max_tokens`` in a generate request)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputSpecError(f"{name} {max_new_tokens!r} must be an integer >= 1")


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
    check_max_new_tokens(max_new_tokens, "max_new_tokens")
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
    check_max_new_tokens(max_new_tokens, "max_new_tokens")
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
