"""The adapters of the small zoo families, ``vision`` (``mlp``, ``cnn``) and ``rnn`` (``lstm``,
``gru``): their report plans with prune and distill chains (:data:`ZOO_PLANS`), report notes for
those rows, and their modules' pruning support (widths read back for ``build(arch)``)."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ...models.rnn import RNNForecaster
from ...models.spec import ModelSpec
from ...models.vision import MLP, LeNet
from ..adapters import ArchAdapter, register_adapter
from ..distill import DEFAULT_TEMPERATURE, distill_entries
from ..prune import REPORT_FINETUNE_STEPS, ArchSupport, chain_entries, register_architecture, report_notes, variant_name

#: Per zoo model: structured sparsities shown (``sweep``), the one carried on to ONNX and
#: ``quantize``; an ``unstructured`` row; a width-0.5 student (``distill``) trained for
#: ``student_epochs`` (``None``: the teacher's recipe), carried on to ``student_quantize``, and with
#: ``control`` the same student trained on labels only. Distillation pays off with patient training
#: (Beyer et al. 2022): the MLP's students train 2x the recipe (cheap) so the report's KD-vs-scratch
#: comparison is meaningful; the CNN's (1x) and LSTM's (0.4x) stay short to keep the report cheap
#: (see benchmarks/prune_distill.py for the full comparison).
ZOO_PLANS: dict[str, dict[str, Any]] = {
    "mlp": {"sweep": [0.5], "chain": 0.5, "quantize": ["int8-dynamic"], "unstructured": False,
            "distill": True, "student_epochs": 120, "control": True, "student_quantize": []},
    "cnn": {"sweep": [0.25, 0.5, 0.75], "chain": 0.5, "quantize": ["int8-static"], "unstructured": True,
            "distill": True, "student_epochs": 30, "control": False, "student_quantize": ["int8-static"]},
    "lstm": {"sweep": [0.5], "chain": 0.5, "quantize": [], "unstructured": False,
             "distill": True, "student_epochs": 60, "control": False, "student_quantize": []},
    "gru": {"sweep": [0.5], "chain": 0.5, "quantize": [], "unstructured": False,
            "distill": False, "student_epochs": None, "control": False, "student_quantize": []},
}


def plan(spec: ModelSpec, plan: list) -> list:
    """The report plan of zoo model ``spec`` with its prune and distill chains appended (see :data:`ZOO_PLANS`).

    Export follow-ons are added only when the plan exports to ONNX, quantize follow-ons only for
    methods the plan already has (``optimize report --methods`` restricts them too).
    """
    cfg = ZOO_PLANS.get(spec.name)
    if not cfg:
        return plan
    exports = any(e[1] == "export" for e in plan)
    have = {e[2] for e in plan if e[1] == "quantize"}
    out = list(plan)
    for s in cfg["sweep"]:
        name = variant_name("structured", s)
        out.append((name, "prune", "structured",
                    {"sparsity": s, "importance": "l2", "finetune_steps": REPORT_FINETUNE_STEPS}, "fp32-torch"))
        if exports and s == cfg["chain"]:
            out += chain_entries(name, [m for m in cfg["quantize"] if m in have])
    if cfg["unstructured"]:
        out.append((variant_name("unstructured", 0.5), "prune", "unstructured",
                    {"sparsity": 0.5, "importance": "l1", "finetune_steps": REPORT_FINETUNE_STEPS}, "fp32-torch"))
    if cfg["distill"]:
        out += distill_entries(width=0.5, temperature=DEFAULT_TEMPERATURE, epochs=cfg["student_epochs"],
                               control=cfg["control"], export=exports,
                               quantize=[m for m in cfg["student_quantize"] if m in have])
    return out


register_architecture(MLP, ArchSupport(
    arch_of=lambda m: {"hidden": [lin.out_features for lin in m.net if isinstance(lin, nn.Linear)][:-1]},
    width_keys=("hidden",), layers_key="hidden"))
register_architecture(LeNet, ArchSupport(
    arch_of=lambda m: {"c1": m.features[0].out_channels, "c2": m.features[2].out_channels,
                       "fc": m.classifier[1].out_features},
    width_keys=("c1", "c2", "fc")))
register_architecture(RNNForecaster, ArchSupport(
    arch_of=lambda m: {"cell": "lstm" if isinstance(m.rnn, nn.LSTM) else "gru", "hidden": m.rnn.hidden_size,
                       "layers": m.rnn.num_layers},
    width_keys=("hidden",), layers_key="layers"))
for _family in ("vision", "rnn"):
    register_adapter(ArchAdapter(_family, plan=plan, measure=report_notes))
