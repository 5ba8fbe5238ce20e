"""The seed zoo: architectures, their ModelSpecs and their seeded training recipes.

| name | architecture | data | metric |
|---|---|---|---|
| ``mlp`` | 64-128-64-10 MLP | digits 8x8 | top-1 accuracy |
| ``cnn`` | LeNet-style CNN (2 conv + 2 fc) | digits 8x8 | top-1 accuracy |
| ``lstm`` | 1-layer LSTM forecaster | sunspots | MAE (lower is better), ARIMA reference |
| ``gru`` | 1-layer GRU forecaster | sunspots | MAE (lower is better), ARIMA reference |
| ``gpt``, ``gpt-draft`` | GPT decoder with KV cache, and its distilled draft | tiny-shakespeare | perplexity |
| ``asr`` | streaming Conformer + LSTM + CTC | espeak-ng speech + noise | CER (lower is better) |
| ``bert`` | pretrained all-MiniLM-L6-v2 sentence encoder (Hugging Face) | held-out sentences | cosine to FP32, recall@1 |
| ``mamba`` | selective state-space LM (Mamba) | tiny-shakespeare | perplexity |
| ``gan``, ``ddpm``, ``flow`` | class-conditional DCGAN, DDPM UNet denoiser, flow matching | digits 8x8 | Frechet distance on the CNN's features |
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from . import data as D
from .spec import ACCURACY, MAE, ModelSpec, TensorSpec
from .train import train_classifier, train_regressor


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


def _prune_distill_hooks(name: str) -> dict:
    """The spec's ``plan`` and ``measure`` hooks that add this model's prune and distill chains to the
    report and their notes (see ``deepship.pipeline.prune.ZOO_PLANS``); imported lazily."""

    def plan(default: list) -> list:
        from ..pipeline.prune import zoo_plan

        return zoo_plan(name, default)

    def measure(ctx: Any, variant: Any, session: Any) -> dict:
        from ..pipeline.prune import report_notes

        return report_notes(ctx, variant, session)

    return {"plan": plan, "measure": measure}


def _digits_spec(name: str, image: bool, build: Callable[[], nn.Module], recipe: dict, desc: str) -> ModelSpec:
    dims = ("batch", 1, 8, 8) if image else ("batch", 64)
    return ModelSpec(
        name=name, task="classification", build=build,
        inputs=[TensorSpec("x", dims, "float32")], output_names=["logits"],
        metric=ACCURACY, data=lambda: D.digits(image), recipe=recipe, train=train_classifier,
        description=desc, **_prune_distill_hooks(name),
    )


def _rnn_spec(cell: str) -> ModelSpec:
    recipe = {"arch": {"cell": cell, "hidden": 64, "layers": 1}, "epochs": 150, "lr": 3e-3,
              "batch_size": 32, "weight_decay": 0.0, "seed": 0, "loss": "mse"}

    def build(arch: dict | None = None) -> nn.Module:
        a = {**recipe["arch"], **(arch or {})}
        mean, std = D.sunspots_train_stats()
        return RNNForecaster(a["cell"], a["hidden"], a["layers"], mean, std)

    return ModelSpec(
        name=cell, task="regression", build=build,
        inputs=[TensorSpec("x", ("batch", "seq", 1), "float32", 0.0, 200.0)], output_names=["forecast"],
        metric=MAE, data=D.sunspots, recipe=recipe, train=train_regressor,
        baselines=lambda ds: [D.arima_baseline()],
        description=f"1-layer {cell.upper()} (64 units) one-step-ahead forecaster, sunspots 1700-2008",
        **_prune_distill_hooks(cell),
    )


def _mlp_build(arch: dict | None = None) -> nn.Module:
    a = {"hidden": [128, 64], **(arch or {})}
    return MLP(64, tuple(a["hidden"]), 10)


def _cnn_build(arch: dict | None = None) -> nn.Module:
    a = {"c1": 32, "c2": 64, "fc": 128, **(arch or {})}
    return LeNet(a["c1"], a["c2"], a["fc"])


def _gpt_spec(name: str) -> ModelSpec:
    from . import gpt  # GPT decoder + draft (deepship/models/gpt.py); needs the tokenizers package

    return gpt.gpt_spec() if name == "gpt" else gpt.draft_spec()


def _asr_spec() -> ModelSpec:
    from . import asr  # streaming Conformer + LSTM + CTC (deepship/models/asr.py); needs espeak-ng for data

    return asr.asr_spec()


def _lazy(module: str, factory: str) -> Callable[[], ModelSpec]:
    """A zoo entry whose module (and its heavier imports) loads on first use:
    ``deepship.models.<module>.<factory>()``."""

    def load() -> ModelSpec:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), factory)()

    return load


ZOO: dict[str, Callable[[], ModelSpec]] = {
    "mlp": lambda: _digits_spec(
        "mlp", False, _mlp_build,
        {"arch": {"hidden": [128, 64]}, "epochs": 60, "lr": 2e-3, "batch_size": 64, "weight_decay": 1e-4, "seed": 0},
        "MLP 64-128-64-10 classifier, scikit-learn 8x8 digits"),
    "cnn": lambda: _digits_spec(
        "cnn", True, _cnn_build,
        {"arch": {"c1": 32, "c2": 64, "fc": 128}, "epochs": 30, "lr": 2e-3, "batch_size": 64, "weight_decay": 1e-4, "seed": 0},
        "LeNet-style CNN (conv32-conv64-pool-fc128-fc10), scikit-learn 8x8 digits"),
    "lstm": lambda: _rnn_spec("lstm"),
    "gru": lambda: _rnn_spec("gru"),
    "gpt": lambda: _gpt_spec("gpt"),
    "gpt-draft": lambda: _gpt_spec("gpt-draft"),
    "asr": lambda: _asr_spec(),
    "bert": _lazy("hf", "minilm_spec"),          # deepship/models/hf.py: all-MiniLM-L6-v2 via transformers/optimum
    "mamba": _lazy("mamba", "mamba_spec"),       # deepship/models/mamba.py: selective SSM language model
    "gan": _lazy("generative", "gan_spec"),      # deepship/models/generative.py: digits generators
    "ddpm": _lazy("generative", "ddpm_spec"),
    "flow": _lazy("generative", "flow_spec"),
}

#: The models ``optimize report`` runs when none are named.
DEFAULT_SET = ["mlp", "cnn", "lstm", "gru"]
