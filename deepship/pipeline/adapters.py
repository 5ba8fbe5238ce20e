"""Per-architecture adapters: what the pipeline must know of a model family beyond its ``ModelSpec``.

The model folders (``deepship/models/<family>/``) hold torch modules, data and training recipes and
know nothing of the pipeline. What the pipeline adds for a family lives here, one small module per
family in :mod:`deepship.pipeline.arch`, found through :func:`adapter_for` by the spec's ``family`` (the way Optimum keeps one ONNX
config per architecture in its exporters rather than in the modeling code):

| field | what it says | example |
|---|---|---|
| ``plan`` | the family's report rows (edits the default plan) | the GPT's KV-cache export, INT4 block sizes, pruned heads |
| ``measure`` | extra per-variant report measures | tokens/s and speculative acceptance; RTF and chunk latency |
| ``evaluate`` | the metric over a variant's session, when the spec's data cannot say it | streaming CER; Frechet distance of generated samples |
| ``export_method`` | the ``export`` stage method that makes the family's FP32 ONNX variant | ``onnx``, ``onnx-kv`` |
| ``export`` | how ``export/onnx`` writes the family's graph | Optimum for Hugging Face encoders |

Importing a family's adapter module registers its stages (``onnx-kv``) and its pruning support
(:func:`deepship.pipeline.prune.register_architecture`). Adapters of the bundled families are
imported on first lookup (:data:`FAMILY_MODULES`); :func:`register_adapter` adds others.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..models.spec import ModelSpec


@dataclass
class ArchAdapter:
    """What the pipeline knows of one architecture family.

    Attributes:
        family: the spec's ``family`` this adapter serves.
        plan: ``(spec, default_plan) -> plan``: the report's variant plan for a model of the family
            (entries ``(name, stage, method, params, parent)``); ``None`` keeps the default.
        measure: ``(ctx, variant, session) -> dict | None`` of extra measurements stored in the report
            row's ``extra`` (tokens/s, acceptance rate, real-time factor, ...); returning ``None`` (or
            no ``measure``) leaves ``extra`` out of the row.
        evaluate: ``(ctx, session) -> float | None``: the metric of a variant's session, overriding
            the spec's metric on its test split (``None`` from it: no metric); ``None`` to use the spec.
        export_method: the ``export`` stage method that gives the family's FP32 ONNX variant in the
            report and in prune/distill chains (``onnx``, or ``onnx-kv`` for KV-cache decoders).
        export: ``(ctx, module, params, out_dir) -> (files, info)``: how the ``export/onnx`` stage writes
            and checks this family's graph (Optimum for Hugging Face encoders); ``None``: deepship's
            dynamo exporter and :func:`deepship.pipeline.parity.parity`.
    """

    family: str
    plan: Callable[[ModelSpec, list], list] | None = None
    measure: Callable[[Any, Any, Any], dict] | None = None
    evaluate: Callable[[Any, Any], float] | None = None
    export_method: str = "onnx"
    export: Callable[[Any, Any, dict, Any], tuple[list[str], dict]] | None = None

    def plan_for(self, spec: ModelSpec, default_plan: list) -> list:
        """The report plan of ``spec``: the adapter's edit of ``default_plan``, or ``default_plan``."""
        return self.plan(spec, list(default_plan)) if self.plan is not None else list(default_plan)


#: family -> module under :mod:`deepship.pipeline.arch` that registers its adapter when imported
FAMILY_MODULES = {"vision": "zoo_small", "rnn": "zoo_small", "gpt": "gpt", "asr": "asr", "hf": "hf", "mamba": "mamba",
                  "generative": "generative"}

_ADAPTERS: dict[str, ArchAdapter] = {}
_DEFAULT = ArchAdapter(family="")


def register_adapter(adapter: ArchAdapter) -> ArchAdapter:
    """Register (or replace) the adapter of ``adapter.family``; returns it."""
    _ADAPTERS[adapter.family] = adapter
    return adapter


def adapter_for(spec: ModelSpec) -> ArchAdapter:
    """The adapter of ``spec.family`` (importing a bundled family's module on first use), or the
    default one (default plan, no extra measures, plain ``onnx`` export) for user models."""
    fam = spec.family
    if fam and fam not in _ADAPTERS and fam in FAMILY_MODULES:
        importlib.import_module(f"{__package__}.arch.{FAMILY_MODULES[fam]}")
    return _ADAPTERS.get(fam, _DEFAULT)
