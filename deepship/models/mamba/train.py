"""Mamba's seeded recipe: the GPT's training loop on this model."""
from __future__ import annotations

from .. import gpt
from ..spec import Dataset
from ..train import train_log
from .model import TARGET, Mamba

RECIPE = {
    "arch": TARGET.to_dict(), "tokenizer": gpt.tokenizer_hash(), "steps": 700, "batch_size": 2,
    "seq_len": TARGET.context, "lr": 5e-3, "min_lr_ratio": 0.1, "warmup": 50, "weight_decay": 0.1,
    "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "threads": 1,
}


def train_mamba(model: Mamba, ds: Dataset | None, recipe: dict) -> dict:
    """The GPT's seeded loop (:func:`deepship.models.gpt.train_gpt`) on this model: random training
    windows, AdamW (no decay on 1-D parameters: norms, ``A_log``, ``D``, ``dt_bias``, conv bias),
    warm-up + cosine; weights rounded to float16 at the end.

    Returns:
        ``{"train_s", "final_loss", "tokens_seen"}``.
    """
    return gpt.train_gpt(model, ds, recipe, progress=train_log("mamba"))
