"""Vision family: ``mlp`` and ``cnn`` on scikit-learn's 8x8 digits (top-1 accuracy).

| name | architecture | data | metric |
|---|---|---|---|
| ``mlp`` | 64-128-64-10 MLP | digits 8x8, 25% stratified held out | top-1 accuracy |
| ``cnn`` | LeNet-style CNN (2 conv + 2 fc) | the same | top-1 accuracy |
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..spec import ACCURACY, ModelSpec, TensorSpec
from .data import digits
from .model import MLP, LeNet, build_cnn, build_mlp  # noqa: F401
from .train import CNN_RECIPE, MLP_RECIPE, train_classifier


def _digits_spec(name: str, image: bool, build: Callable[..., nn.Module], recipe: dict, desc: str) -> ModelSpec:
    dims = ("batch", 1, 8, 8) if image else ("batch", 64)
    return ModelSpec(
        name=name, task="classification", build=build, family="vision",
        inputs=[TensorSpec("x", dims, "float32")], output_names=["logits"],
        metric=ACCURACY, data=lambda: digits(image), recipe=recipe, train=train_classifier, description=desc)


def mlp_spec() -> ModelSpec:
    """The ``mlp`` zoo entry: input float32 ``(batch, 64)`` in [0, 1], logits float32 ``(batch, 10)``."""
    return _digits_spec("mlp", False, build_mlp, dict(MLP_RECIPE), "MLP 64-128-64-10 classifier, scikit-learn 8x8 digits")


def cnn_spec() -> ModelSpec:
    """The ``cnn`` zoo entry: input float32 ``(batch, 1, 8, 8)`` in [0, 1], logits float32 ``(batch, 10)``."""
    return _digits_spec("cnn", True, build_cnn, dict(CNN_RECIPE),
                        "LeNet-style CNN (conv32-conv64-pool-fc128-fc10), scikit-learn 8x8 digits")


#: the zoo entries of this family (read by :mod:`deepship.models.zoo`)
SPECS = {"mlp": mlp_spec, "cnn": cnn_spec}
