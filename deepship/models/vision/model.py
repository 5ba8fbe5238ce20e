"""The digits classifiers (torch only): a multilayer perceptron and a LeNet-style CNN."""
from __future__ import annotations

import torch
import torch.nn as nn


class MLP(nn.Module):
    """Digits MLP. Input float32 ``(batch, 64)`` in [0, 1]; output logits float32 ``(batch, 10)``."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (128, 64), classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """LeNet-style digits CNN (LeCun et al. 1998), sized for 8x8 inputs.

    Input float32 ``(batch, 1, 8, 8)``; output logits float32 ``(batch, 10)``.
    """

    def __init__(self, c1: int = 32, c2: int = 64, fc: int = 128, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, fc), nn.ReLU(), nn.Linear(fc, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_mlp(arch: dict | None = None) -> nn.Module:
    """The ``mlp`` zoo module; ``arch``: ``{"hidden": [128, 64]}`` (hidden widths, set by pruning)."""
    a = {"hidden": [128, 64], **(arch or {})}
    return MLP(64, tuple(a["hidden"]), 10)


def build_cnn(arch: dict | None = None) -> nn.Module:
    """The ``cnn`` zoo module; ``arch``: ``{"c1": 32, "c2": 64, "fc": 128}`` (widths, set by pruning)."""
    a = {"c1": 32, "c2": 64, "fc": 128, **(arch or {})}
    return LeNet(a["c1"], a["c2"], a["fc"])
