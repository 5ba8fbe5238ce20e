"""The ``prune`` stages (torch -> torch): prune, fine-tune on the model's training data, save; the
variant names and the chains that carry a pruned model on to ONNX and quantization; report notes."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ...errors import StageError
from ...exporters.onnx import dynamic_shapes
from ...models.train import save_weights
from ...runtimes.session import TorchSession
from ..context import ModelContext
from ..evaluate import evaluate
from ..quantize import QUANT_DEFAULT_PARAMS
from ..stages import register_stage
from ..variants import Variant
from .archs import arch_of
from .torch_pruning import (IMPORTANCE_CRITERIA, PRUNE_METHODS, _tp_version, count_nonzero, count_parameters,
                            gzip_size, make_permanent, structured_prune, train_threads, unstructured_masks)

DEFAULT_FINETUNE_STEPS = 300
FINETUNE_LR_FACTOR = 0.5
#: Fine-tune steps used in the report's default plan (kept small: the whole default report must
#: build cold in a few minutes on 2 cores). The benchmark and the CLI default use more.
REPORT_FINETUNE_STEPS = 100


def example_args(ctx: ModelContext) -> tuple:
    """The spec's example inputs as torch tensors, in ``forward()`` order (for tracing)."""
    return tuple(torch.from_numpy(v) for v in ctx.spec.example_inputs().values())



def finetune(ctx: ModelContext, module: nn.Module, steps: int, lr_factor: float = FINETUNE_LR_FACTOR) -> dict:
    """Short fine-tune with the spec's own seeded training loop and training split.

    ``steps`` optimizer steps are rounded to whole epochs of the recipe's batch size; the learning
    rate is the recipe's times ``lr_factor`` (cosine decay, AdamW, as in training).

    Returns:
        ``{"steps", "epochs", "lr", "train_s", "final_loss"}``, or ``{"skipped": reason}`` when the
        model has no labeled training data (a user model without ``--train-data``) or no recipe. A
        user model with ``--train-data`` trains with :func:`deepship.models.train.fit_supervised`
        (early stopping on a split of the training data).
    """
    spec = ctx.spec
    if steps <= 0:
        return {"skipped": "finetune_steps=0"}
    ds = ctx.dataset()
    if spec.train is not None and spec.recipe is not None and "steps" in spec.recipe:
        # a step-based recipe (the GPT's train_gpt samples its own windows from the training text)
        r = spec.recipe
        recipe = {**r, "steps": int(steps), "lr": float(r["lr"]) * lr_factor,
                  "warmup": min(int(r.get("warmup", 0)), max(1, steps // 10))}
        stats = spec.train(module, ds, recipe)
        module.eval()
        return {"steps": int(steps), "lr": recipe["lr"], **stats}
    if ds is None or ds.train.targets is None:
        return {"skipped": "no labeled training data: pass --train-data FILE.npz (inputs and targets) to fine-tune"}
    if spec.train is None or spec.recipe is None:
        return {"skipped": "the model has no training recipe"}
    bs = int(spec.recipe.get("batch_size", 32))
    per_epoch = math.ceil(len(ds.train) / bs)
    epochs = max(1, round(steps / per_epoch))
    recipe = {**spec.recipe, "epochs": epochs, "lr": float(spec.recipe["lr"]) * lr_factor}
    with train_threads(module):
        stats = spec.train(module, ds, recipe)
    module.eval()
    return {"steps": epochs * per_epoch, "epochs": epochs, "lr": recipe["lr"], **stats}


def _metric(ctx: ModelContext, module: nn.Module) -> float | None:
    sess = TorchSession(module, [t.name for t in ctx.spec.inputs], ctx.spec.output_names)
    return evaluate(ctx, sess, None)["metric"]


def parent_module(ctx: ModelContext, parent: Variant) -> nn.Module:
    """A private FP32 copy of ``parent``'s torch module (the baseline module itself is shared).

    Raises:
        StageError: the parent is not FP32 (prune or distill before casting to BF16).
    """
    if parent.info.get("dtype", "float32") != "float32":
        raise StageError(f"'{parent.name}' is {parent.info.get('dtype')}; prune/distill the FP32 model, then cast")
    return copy.deepcopy(ctx.torch_session(parent).module).float().eval()


def save_torch_variant(ctx: ModelContext, module: nn.Module, out: Path) -> tuple[list[str], dict]:
    """Save a (re-shaped) torch module so :meth:`ModelContext.torch_session` can reopen it.

    If the spec's ``build(arch)`` can express ``arch_of(module)`` (the built module takes the state
    dict strictly), writes ``weights.safetensors`` and returns ``info["arch"]``; otherwise writes a
    ``torch.export`` program ``model.pt2`` with the spec's dynamic dims.

    Raises:
        StageError: neither form works (the module cannot be traced by ``torch.export``).
    """

    arch = arch_of(module)
    if ctx.spec.build is not None and ctx.spec.source == "zoo":
        try:
            probe = ctx.fresh_module(arch)
            probe.load_state_dict(module.state_dict(), strict=True)
            save_weights(module, out / "weights.safetensors")
            return ["weights.safetensors"], {"arch": arch}
        except (RuntimeError, TypeError, KeyError):
            pass

    try:
        ep = torch.export.export(module.eval(), example_args(ctx), dynamic_shapes=dynamic_shapes(ctx.spec.inputs))
        torch.export.save(ep, str(out / "model.pt2"))
    except Exception as e:
        raise StageError(f"cannot save the pruned {type(module).__name__}: its architecture is not one build(arch) "
                         f"can express and torch.export failed ({type(e).__name__}); register it with "
                         "register_architecture") from None
    return ["model.pt2"], {"arch": None, "saved_as": "torch.export program (.pt2)"}


# ---- the stages ---------------------------------------------------------------------------------

def _importance_doc(importance: str, structured: bool) -> str:
    p = IMPORTANCE_CRITERIA[importance]
    if structured:
        return (f"group L{p} magnitude: torch-pruning MagnitudeImportance(p={p}, group_reduction='mean', "
                "normalizer='mean'), LSTM/GRU gate weights included")
    return "magnitude |w| (torch.nn.utils.prune.L1Unstructured, global over all weight matrices)"


@register_stage("prune", "structured", "torch", "torch", uses_data=True)
def _structured_stage(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """Remove channels/hidden units with torch-pruning's dependency graph, then fine-tune."""
    sparsity = float(params.get("sparsity", 0.5))
    importance = str(params.get("importance", "l2"))
    steps = int(params.get("finetune_steps", DEFAULT_FINETUNE_STEPS))
    module = parent_module(ctx, parent)
    module, info = structured_prune(module, example_args(ctx), sparsity, importance, params.get("round_to"))
    metric_before_ft = _metric(ctx, module) if ctx.dataset() is not None else None
    ft = finetune(ctx, module, steps)
    files, saved = save_torch_variant(ctx, module, out)
    return files, {**saved, **info, "sparsity": sparsity, "importance": _importance_doc(importance, True),
                   "param_reduction": 1.0 - info["parameters"] / info["parameters_before"],
                   "metric_before_finetune": metric_before_ft, "finetune": ft,
                   "library": f"torch-pruning {_tp_version()} (DependencyGraph + MetaPruner)"}


@register_stage("prune", "unstructured", "torch", "torch", uses_data=True)
def _unstructured_stage(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """Zero the smallest weights (global L1, torch.nn.utils.prune), fine-tune with masks, make permanent."""
    sparsity = float(params.get("sparsity", 0.5))
    importance = str(params.get("importance", "l1"))
    if importance not in IMPORTANCE_CRITERIA:
        raise StageError(f"unknown importance '{importance}'; use one of {', '.join(IMPORTANCE_CRITERIA)}")
    steps = int(params.get("finetune_steps", DEFAULT_FINETUNE_STEPS))
    module = parent_module(ctx, parent)
    n = count_parameters(module)
    masked = unstructured_masks(module, sparsity)
    metric_before_ft = _metric(ctx, module) if ctx.dataset() is not None else None
    ft = finetune(ctx, module, steps)
    make_permanent(masked)
    files, saved = save_torch_variant(ctx, module, out)
    if saved.get("arch") is None and parent.info.get("arch") is not None and files[0].endswith(".safetensors"):
        saved["arch"] = parent.info["arch"]
    nz = count_nonzero(module)
    gz = gzip_size([out / f for f in files])
    gz_parent = gzip_size([Path(parent.dir) / f for f in parent.files]) if parent.dir and parent.files else None
    return files, {**saved, "sparsity": sparsity, "importance": _importance_doc(importance, False),
                   "parameters": n, "parameters_before": n, "nonzero_parameters": nz,
                   "achieved_sparsity": 1.0 - nz / n, "gzip_bytes": gz, "parent_gzip_bytes": gz_parent,
                   "metric_before_finetune": metric_before_ft, "finetune": ft,
                   "note": "unstructured pruning zeroes weights but keeps dense tensors: size on disk and latency "
                           "do not change; only the compressed (gzip) size shrinks",
                   "library": f"torch {torch.__version__} torch.nn.utils.prune (global L1Unstructured + prune.remove)"}


# ---- names, chains, the zoo's report plan, report notes -------------------------------------------

def variant_name(method: str, sparsity: float) -> str:
    """``pruned-structured-50`` for ``method="structured", sparsity=0.5``."""
    if method not in PRUNE_METHODS:
        raise StageError(f"unknown prune method '{method}'; use one of {', '.join(PRUNE_METHODS)}")
    return f"pruned-{method}-{int(round(sparsity * 100))}"


def export_method(ctx: ModelContext) -> str:
    """The export method of the model's family for its FP32 ONNX variant (``onnx``, or ``onnx-kv`` for
    the GPT decoder's prefill + decode graphs): :attr:`deepship.pipeline.adapters.ArchAdapter.export_method`."""
    return ctx.arch.export_method


def chain_entries(name: str, quantize: Sequence[str] = (), export_method: str = "onnx"
                  ) -> list[tuple[str, str, str, dict, str]]:
    """Plan entries that carry the torch variant ``name`` on: ``NAME-onnx`` (export with
    ``export_method``, parity-checked) and ``NAME-<method>`` for each quantize method (on the ONNX
    model; ``bf16`` on the torch one)."""

    out = [(f"{name}-onnx", "export", export_method, {}, name)]
    for m in quantize:
        parent = name if m == "bf16" else f"{name}-onnx"
        out.append((f"{name}-{m}", "quantize", m, dict(QUANT_DEFAULT_PARAMS.get(m, {})), parent))
    return out


#: Fine-tune steps used in the report's default plan (kept small: the whole default report must
#: build cold in a few minutes on 2 cores). The benchmark and the CLI default use more.


def report_notes(ctx: ModelContext, v: Variant, session: Any = None) -> dict:
    """Extra report notes for prune/distill rows and their descendants (the spec's ``measure`` hook).

    Prune rows: sparsity, importance, parameters before -> after, metric before the fine-tune;
    unstructured rows and their descendants: gzip size against the parent's (the honest size win).
    Distill rows: student architecture, parameter ratio to the teacher, temperature, alpha.
    """
    notes: dict[str, Any] = {}
    i = v.info
    if v.stage == "prune":
        notes["params"] = f"{i.get('parameters_before', 0):,} -> {i.get('parameters', 0):,}"
        if v.method == "unstructured":
            notes["zeroed"] = f"{i.get('achieved_sparsity', 0) * 100:.0f}% of weights (dense size/latency unchanged)"
        notes["importance"] = "L1" if "L1" in str(i.get("importance")) or "|w|" in str(i.get("importance")) else "L2"
        mb = i.get("metric_before_finetune")
        if mb is not None and ctx.spec.metric is not None:
            notes["metric before fine-tune"] = round(mb * ctx.spec.metric.scale, 2)
    elif v.stage == "distill":
        notes["student"] = i.get("student_arch") or i.get("student")
        notes["params vs teacher"] = f"{i.get('param_ratio', 0):.2f}x"
        notes["loss"] = i.get("loss_name")
    lineage = ctx.lineage(v)
    un = next((a for a in lineage if a.stage == "prune" and a.method == "unstructured"), None)
    if un is not None and v.dir and v.files:
        gz = gzip_size([Path(v.dir) / f for f in v.files])
        notes["gzip"] = f"{gz:,} B"
        if v is un and i.get("parent_gzip_bytes"):
            notes["gzip"] += f" (parent {i['parent_gzip_bytes']:,} B)"
    return notes
