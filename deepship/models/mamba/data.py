"""Mamba's data and metric: the GPT's text, tokenizer, windows and held-out perplexity."""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import gpt
from ..spec import Dataset, Split
from .model import TARGET, MambaConfig


def dataset(cfg: MambaConfig = TARGET) -> Dataset:
    """The report's data: :func:`deepship.models.gpt.dataset`'s windows (held-out ``test``: 32 x 64
    tokens; ``train``: 256 x 64 for calibration) with ``input_ids`` only (no KV cache here)."""
    ds = gpt.dataset(gpt.TARGET)
    keep = lambda s: Split({"input_ids": s.inputs["input_ids"]}, s.targets)  # noqa: E731
    return Dataset(keep(ds.train), keep(ds.test), ds.source)


def perplexity(session: Any, cfg: MambaConfig = TARGET, ids: np.ndarray | None = None, batch: int = 8) -> float:
    """Held-out perplexity of a session (inputs ``input_ids``, output ``logits``), by
    :func:`deepship.models.gpt.perplexity`: all held-out tokens (default) in non-overlapping windows of
    ``cfg.context`` tokens, as for the GPT, so the numbers compare."""
    return gpt.perplexity(session, ids=ids, window=cfg.context, batch=batch)
