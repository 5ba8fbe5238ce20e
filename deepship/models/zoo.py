"""The zoo: a registry of model names, each an architecture family folder's ``ModelSpec`` factory.

| name | family (``deepship/models/<family>/``) | architecture | data | metric |
|---|---|---|---|---|
| ``mlp``, ``cnn`` | ``vision`` | 64-128-64-10 MLP; LeNet-style CNN | digits 8x8 | top-1 accuracy |
| ``lstm``, ``gru`` | ``rnn`` | 1-layer LSTM / GRU forecaster | sunspots | MAE, ARIMA reference |
| ``gpt``, ``gpt-draft`` | ``gpt`` | GPT decoder with KV cache, and its distilled draft | tiny-shakespeare | perplexity |
| ``asr`` | ``asr`` | streaming Conformer + LSTM + CTC | espeak-ng speech + noise | CER |
| ``bert`` | ``hf`` | pretrained all-MiniLM-L6-v2 sentence encoder (Hugging Face) | held-out sentences | cosine to FP32, recall@1 |
| ``mamba`` | ``mamba`` | selective state-space LM (Mamba-2) | tiny-shakespeare | perplexity |
| ``gan``, ``ddpm``, ``flow`` | ``generative`` | DCGAN, DDPM UNet denoiser, flow matching | digits 8x8 | Frechet distance |

A family folder holds ``model.py`` (the ``nn.Module`` and its config, torch only), ``data.py``,
``train.py`` (the seeded recipe) and ``__init__.py`` with ``SPECS`` (zoo name -> spec factory). Family
modules load on first use (some import heavy libraries: transformers, tokenizers): :data:`FAMILIES`
says which folder holds which name. :func:`register_model` adds a name from outside the package.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Callable, Iterator

from .spec import ModelSpec

#: zoo name -> family folder under ``deepship/models/`` whose ``SPECS`` has the factory
FAMILIES: dict[str, str] = {
    "mlp": "vision", "cnn": "vision", "lstm": "rnn", "gru": "rnn", "gpt": "gpt", "gpt-draft": "gpt", "asr": "asr",
    "bert": "hf", "mamba": "mamba", "gan": "generative", "ddpm": "generative", "flow": "generative",
}

_EXTRA: dict[str, Callable[[], ModelSpec]] = {}


def register_model(name: str, factory: Callable[[], ModelSpec]) -> None:
    """Add zoo entry ``name`` (``factory() -> ModelSpec``), e.g. a family living outside this package.

    Raises:
        ValueError: ``name`` is already a zoo name.
    """
    if name in FAMILIES or name in _EXTRA:
        raise ValueError(f"zoo name '{name}' is taken")
    _EXTRA[name] = factory


class _Zoo(Mapping):
    """Read-only mapping zoo name -> spec factory; a family module is imported on first lookup."""

    def __getitem__(self, name: str) -> Callable[[], ModelSpec]:
        if name in _EXTRA:
            return _EXTRA[name]
        family = FAMILIES[name]
        return importlib.import_module(f"{__package__}.{family}").SPECS[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(FAMILIES) + list(_EXTRA))

    def __len__(self) -> int:
        return len(FAMILIES) + len(_EXTRA)

    def __contains__(self, name: object) -> bool:
        return name in FAMILIES or name in _EXTRA


ZOO: Mapping[str, Callable[[], ModelSpec]] = _Zoo()

#: The models ``optimize report`` runs when none are named.
DEFAULT_SET = ["mlp", "cnn", "lstm", "gru"]
