"""Token selection for generation: greedy, or sampling at a temperature with top-k and/or top-p
(nucleus, Holtzman et al. 2020) filtering; seeded NumPy generator."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputSpecError


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
