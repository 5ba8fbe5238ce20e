"""The digits classifiers' seeded recipes; the loop is the shared cross-entropy trainer
(:func:`deepship.models.train.train_classifier`: AdamW, cosine decay)."""
from __future__ import annotations

from ..train import train_classifier  # noqa: F401  (the recipes' training loop)

MLP_RECIPE = {"arch": {"hidden": [128, 64]}, "epochs": 60, "lr": 2e-3, "batch_size": 64, "weight_decay": 1e-4,
              "seed": 0}
CNN_RECIPE = {"arch": {"c1": 32, "c2": 64, "fc": 128}, "epochs": 30, "lr": 2e-3, "batch_size": 64,
              "weight_decay": 1e-4, "seed": 0}
