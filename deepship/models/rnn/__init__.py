"""Recurrent family: ``lstm`` and ``gru`` one-step-ahead forecasters on statsmodels' sunspots (MAE,
lower is better), with an ARIMA(9,0,1) classical reference."""
from __future__ import annotations

import torch.nn as nn

from ..spec import MAE, ModelSpec, TensorSpec
from .data import arima_baseline, sunspots, sunspots_train_stats
from .model import RNNForecaster
from .train import recipe, train_regressor


def rnn_spec(cell: str) -> ModelSpec:
    """The ``lstm`` or ``gru`` zoo entry: input float32 ``(batch, seq, 1)`` raw sunspot numbers,
    output float32 ``(batch, 1)`` (next year's value)."""
    r = recipe(cell)

    def build(arch: dict | None = None) -> nn.Module:
        a = {**r["arch"], **(arch or {})}
        mean, std = sunspots_train_stats()
        return RNNForecaster(a["cell"], a["hidden"], a["layers"], mean, std)

    return ModelSpec(
        name=cell, task="regression", build=build, family="rnn",
        inputs=[TensorSpec("x", ("batch", "seq", 1), "float32", 0.0, 200.0)], output_names=["forecast"],
        metric=MAE, data=sunspots, recipe=r, train=train_regressor,
        baselines=lambda ds: [arima_baseline()],
        description=f"1-layer {cell.upper()} (64 units) one-step-ahead forecaster, sunspots 1700-2008")


#: the zoo entries of this family (read by :mod:`deepship.models.zoo`)
SPECS = {"lstm": lambda: rnn_spec("lstm"), "gru": lambda: rnn_spec("gru")}
