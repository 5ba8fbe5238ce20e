"""How pruning and distillation read and shrink one module class: the :class:`ArchSupport` registry.

A family's adapter (:mod:`deepship.pipeline.arch`) registers its module classes here:
``arch_of`` (the architecture of a pruned instance, in the keys its spec's ``build(arch)`` takes),
``pruner_kwargs`` (extra torch-pruning ``MetaPruner`` arguments: ``num_heads``, ``prune_num_heads``,
``head_pruning_ratio``, ``ignored_layers``, ``output_transform``), ``prepare``/``finish`` hooks around
pruning, and ``width_keys``/``layers_key`` (what a distillation student scales).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn


@dataclass
class ArchSupport:
    """How pruning and distillation handle one module class.

    Attributes:
        arch_of: ``module -> arch dict`` in the keys the spec's ``build(arch)`` takes, read from a
            (possibly pruned) instance.
        width_keys: arch keys scaled by a width factor when a smaller student is derived (ints or
            lists of ints).
        layers_key: arch key that holds the depth: an int (number of layers) or a list (one entry
            per hidden layer, truncated); ``None`` when the depth is fixed.
        pruner_kwargs: ``(module, sparsity) -> dict`` of extra ``torch_pruning.pruner.MetaPruner``
            arguments (``num_heads``, ``prune_num_heads``, ``head_pruning_ratio``, ``ignored_layers``,
            ``output_transform``, ...); called after ``prepare``.
        prepare: ``module -> None`` run before tracing (e.g. split a fused QKV projection).
        finish: ``module -> None`` run after pruning (e.g. fuse it again, update head counts).
    """

    arch_of: Callable[[nn.Module], dict]
    width_keys: tuple[str, ...] = ()
    layers_key: str | None = None
    pruner_kwargs: Callable[[nn.Module, float], dict] = field(default=lambda m, s: {})
    prepare: Callable[[nn.Module], None] | None = None
    finish: Callable[[nn.Module], None] | None = None


ARCHS: dict[type, ArchSupport] = {}


def register_architecture(cls: type, support: ArchSupport) -> None:
    """Register how pruning/distillation read and shrink the architecture of ``cls`` instances."""
    ARCHS[cls] = support


def arch_support(module: Any) -> ArchSupport | None:
    """The registered :class:`ArchSupport` of ``module``'s class (or a base class), else ``None``."""
    for cls in type(module).__mro__:
        if cls in ARCHS:
            return ARCHS[cls]
    return None


def arch_of(module: Any) -> dict | None:
    """Architecture dict of ``module`` (see :class:`ArchSupport`), or ``None`` if its class is not registered."""
    s = arch_support(module)
    return s.arch_of(module) if s else None
