"""The recurrent forecasters (torch only): one LSTM or GRU layer and a linear head."""
from __future__ import annotations

import torch
import torch.nn as nn


class RNNForecaster(nn.Module):
    """One-step-ahead forecaster: an LSTM or GRU over a window, then a linear head.

    Normalization lives inside the module (buffers), so the exported model takes raw values.
    Input float32 ``(batch, seq, 1)`` (sunspot numbers); output float32 ``(batch, 1)``.
    """

    def __init__(self, cell: str = "lstm", hidden: int = 64, layers: int = 1, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(1, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn((x - self.mean) / self.std)
        return self.head(y[:, -1]) * self.std + self.mean
