"""The forecasters' seeded recipe; the loop is the shared regression trainer
(:func:`deepship.models.train.train_regressor`: MSE on the model's own scale, AdamW, cosine decay)."""
from __future__ import annotations

from ..train import train_regressor  # noqa: F401  (the recipe's training loop)


def recipe(cell: str) -> dict:
    """The seeded recipe of the ``lstm`` / ``gru`` zoo entry."""
    return {"arch": {"cell": cell, "hidden": 64, "layers": 1}, "epochs": 150, "lr": 3e-3,
            "batch_size": 32, "weight_decay": 0.0, "seed": 0, "loss": "mse"}
