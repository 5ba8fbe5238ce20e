"""Pruning as pipeline stages (torch -> torch), and the sparsity sweep.

| method | library | what it removes | what it speeds up |
|---|---|---|---|
| ``structured`` | torch-pruning (``DependencyGraph`` + ``MetaPruner``, Fang et al. 2023, "DepGraph: Towards Any Structural Pruning") | whole channels (Conv), hidden units (Linear, LSTM/GRU/RNN): the layers get physically smaller | dense latency and size, in every runtime |
| ``unstructured`` | ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``, then ``prune.remove`` | single weights, set to zero (global magnitude ranking over all weight matrices) | **only the compressed size** (gzip): the tensors stay dense, so size on disk and latency do not change |

Both are followed by a short fine-tune on the model's own training data (the spec's seeded recipe
with ``epochs`` derived from ``finetune_steps`` and half its learning rate); unstructured masks stay
attached during the fine-tune, so pruned weights stay zero, and are made permanent afterwards.

Importance criteria (``importance=``): ``l2`` (default) or ``l1``: the group magnitude of
torch-pruning's ``MagnitudeImportance(p)``: the L_p norm of every weight that belongs to a channel,
summed over each layer the channel touches (its outgoing Conv/Linear rows, incoming columns of the
next layer, and for LSTM/GRU the rows of every gate in ``weight_ih``/``weight_hh`` plus the
``weight_hh`` column), averaged over the group and mean-normalized. Unstructured pruning ranks single
weights by ``|w|`` (L1 and L2 rank single weights identically).

``sparsity`` means, for ``structured``, the fraction of channels / hidden units removed from every
prunable layer (torch-pruning's ``pruning_ratio``; the parameter count falls faster, about
``1 - (1 - s)^2`` for layers between two pruned ones); for ``unstructured``, the fraction of weights
(matrix entries, biases excluded) set to zero. Layers that produce a model output are never
shrunk (the output shape stays).

A pruned torch variant keeps its new architecture in ``Variant.info["arch"]`` when the zoo's
``build(arch)`` can express it (MLP hidden sizes, LeNet ``c1``/``c2``/``fc``, RNN ``hidden``);
otherwise it is saved as a ``torch.export`` program (``model.pt2``). Either way it flows on through
export -> quantize -> engine -> report like any torch variant.

Extension point (attention models): call :func:`register_architecture` for the module class with
``arch_of`` (architecture of a pruned instance, in the keys its spec's ``build(arch)`` takes),
``pruner_kwargs`` (extra ``MetaPruner`` arguments: ``num_heads={q/k/v Linear: n_heads}``,
``prune_num_heads=True``, ``head_pruning_ratio``, ``ignored_layers`` such as tied embeddings,
``output_transform``), ``prepare``/``finish`` hooks around the pruning and ``width_keys`` (keys
scaled when a distillation student is derived). The zoo's GPT decoder registers this way
(:func:`deepship.models.gpt.pruning_support`: whole heads and MLP width).
"""
from __future__ import annotations

import contextlib
import copy
import gzip
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import StageError
from .stages import ModelContext, register_stage
from .variants import Variant

PRUNE_METHODS = ("structured", "unstructured")
IMPORTANCE_CRITERIA = {"l1": 1, "l2": 2}
DEFAULT_FINETUNE_STEPS = 300
FINETUNE_LR_FACTOR = 0.5
RNN_TYPES = (nn.LSTM, nn.GRU, nn.RNN)
_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}
PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear) + RNN_TYPES


# ---- architectures ------------------------------------------------------------------------------

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


def _register_zoo() -> None:
    from ..models import gpt
    from ..models.zoo import MLP, LeNet, RNNForecaster

    register_architecture(gpt.GPT, gpt.pruning_support())

    register_architecture(MLP, ArchSupport(
        arch_of=lambda m: {"hidden": [l.out_features for l in m.net if isinstance(l, nn.Linear)][:-1]},
        width_keys=("hidden",), layers_key="hidden"))
    register_architecture(LeNet, ArchSupport(
        arch_of=lambda m: {"c1": m.features[0].out_channels, "c2": m.features[2].out_channels,
                           "fc": m.classifier[1].out_features},
        width_keys=("c1", "c2", "fc")))
    register_architecture(RNNForecaster, ArchSupport(
        arch_of=lambda m: {"cell": "lstm" if isinstance(m.rnn, nn.LSTM) else "gru", "hidden": m.rnn.hidden_size,
                           "layers": m.rnn.num_layers},
        width_keys=("hidden",), layers_key="layers"))


_register_zoo()


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


# ---- torch-pruning plumbing: LSTM/GRU hidden units, importance, output layers --------------------

def _tp():
    try:
        import torch_pruning as tp
    except ImportError:  # pragma: no cover - a declared dependency
        raise StageError("structured pruning needs torch-pruning; pip install torch-pruning") from None
    return tp


def _tp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _rnn_pruner_class():
    tp = _tp()

    class RNNHiddenPruner(tp.pruner.BasePruningFunc):
        """torch-pruning layer pruner for single-layer, unidirectional ``nn.LSTM``/``nn.GRU``/``nn.RNN``.

        Removing hidden unit ``j`` removes row ``j`` of every gate block of ``weight_ih_l0``,
        ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0`` (gate order i,f,g,o for LSTM; r,z,n for GRU)
        and column ``j`` of ``weight_hh_l0``. Registered through ``customized_pruners`` so the
        dependency graph (not this class) decides which consumers shrink with it. (torch-pruning
        1.6's built-in LSTM pruner indexes the gate blocks wrongly and has no GRU pruner.)
        """

        TARGET_MODULES = RNN_TYPES

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            h = layer.hidden_size
            keep = torch.tensor(sorted(set(range(h)) - set(int(i) for i in idxs)), dtype=torch.long)
            rows = torch.cat([keep + g * h for g in range(_GATES[type(layer)])])
            with torch.no_grad():
                for name in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0"):
                    p = getattr(layer, name, None)
                    if p is not None:
                        setattr(layer, name, nn.Parameter(p.data.index_select(0, rows).contiguous()))
                w = layer.weight_hh_l0.data.index_select(0, rows).index_select(1, keep)
                layer.weight_hh_l0 = nn.Parameter(w.contiguous())
            layer.hidden_size = len(keep)
            return layer

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            keep = torch.tensor(sorted(set(range(layer.input_size)) - set(int(i) for i in idxs)), dtype=torch.long)
            with torch.no_grad():
                layer.weight_ih_l0 = nn.Parameter(layer.weight_ih_l0.data.index_select(1, keep).contiguous())
            layer.input_size = len(keep)
            return layer

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.hidden_size

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.input_size

    return RNNHiddenPruner


def rnn_unit_norms(layer: nn.Module, p: int) -> torch.Tensor:
    """Per hidden unit, the sum of ``|w|^p`` over every weight of that unit in a single-layer RNN.

    Returns float32 ``(hidden_size,)``: gate rows of ``weight_ih_l0`` and ``weight_hh_l0`` plus the
    unit's ``weight_hh_l0`` column.
    """
    h, g = layer.hidden_size, _GATES[type(layer)]
    wih = layer.weight_ih_l0.detach().abs().pow(p).reshape(g, h, -1).sum((0, 2))
    whh = layer.weight_hh_l0.detach().abs().pow(p)
    rows = whh.reshape(g, h, -1).sum((0, 2))
    cols = whh.sum(0)
    return (wih + rows + cols).float()


def _importance(p: int):
    tp = _tp()

    class RNNAwareMagnitudeImportance(tp.importance.MagnitudeImportance):
        """torch-pruning's group ``MagnitudeImportance(p)``, with LSTM/GRU hidden units scored too.

        The stock importance only scores Conv/Linear/BatchNorm/LayerNorm weights; a hidden unit of
        a customized RNN layer would be ranked by the next layer's input columns alone. Here the
        unit's own weights (:func:`rnn_unit_norms`) join the group before the reduction.
        """

        @torch.no_grad()
        def __call__(self, group):
            extra_imp, extra_idx = [], []
            for i, (dep, idxs) in enumerate(group):
                if isinstance(dep.layer, RNN_TYPES) and getattr(dep.pruning_fn, "__name__", "") == "prune_out_channels":
                    extra_imp.append(rnn_unit_norms(dep.layer, self.p)[list(idxs)])
                    extra_idx.append(group[i].root_idxs)
            self._extra = (extra_imp, extra_idx)
            out = super().__call__(group)
            if out is None and extra_imp:
                out = self._normalize(super()._reduce(extra_imp, extra_idx), self.normalizer)
            return out

        def _reduce(self, group_imp, group_idxs):
            extra_imp, extra_idx = getattr(self, "_extra", ([], []))
            return super()._reduce(list(group_imp) + extra_imp, list(group_idxs) + extra_idx)

    return RNNAwareMagnitudeImportance(p=p, group_reduction="mean", normalizer="mean")


def _customized_pruners() -> dict:
    pruner = _rnn_pruner_class()()
    return {t: pruner for t in RNN_TYPES}


def output_layers(dg) -> list[nn.Module]:
    """Prunable layers whose output reaches a model output through parameter-free ops only.

    Walks torch-pruning's dependency graph back from its terminal nodes (no consumers) through
    activations, reshapes, element-wise ops and normalizations until a Conv/Linear/RNN layer.
    Those layers keep their output width (the model's output shape must not change).
    """
    terminal = [n for n in dg.module2node.values() if not n.outputs]
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack = list(terminal)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, PRUNABLE_TYPES):
            if not any(n.module is f for f in found):
                found.append(n.module)
            continue
        stack.extend(n.inputs)
    return found


def why_not_structured(module: Any) -> str | None:
    """Why ``module`` cannot be pruned structurally here, or ``None`` if it can (before tracing)."""
    if isinstance(module, (torch.fx.GraphModule, ExportedModule)):
        return ("it is a torch.export program: its layers are graph nodes, not nn.Modules that torch-pruning can "
                "resize; prune the original nn.Module (package.module:factory) and export afterwards")
    if not isinstance(module, nn.Module):
        return f"it is a {type(module).__name__}, not a torch.nn.Module"
    for name, m in module.named_modules():
        if isinstance(m, RNN_TYPES):
            if m.num_layers != 1 or m.bidirectional or getattr(m, "proj_size", 0):
                return (f"layer '{name}' is a {type(m).__name__} with num_layers={m.num_layers}, "
                        f"bidirectional={m.bidirectional}, proj_size={getattr(m, 'proj_size', 0)}: hidden-unit "
                        "pruning here handles single-layer, unidirectional RNNs without projection (stack them as "
                        "separate layers)")
        heads = getattr(m, "num_heads", None) or getattr(m, "n_head", None)
        if isinstance(heads, int) and heads > 1 and not arch_support(module):
            return (f"layer '{name}' ({type(m).__name__}) splits its width into {heads} attention heads, which "
                    "torch-pruning must be told about or the head reshapes break: register the architecture with "
                    "deepship.pipeline.prune.register_architecture (pruner_kwargs num_heads=..., prune_num_heads=True)")
    if not any(isinstance(m, PRUNABLE_TYPES) for m in module.modules()):
        return "it has no Conv, Linear, LSTM, GRU or RNN layer whose channels could be removed"
    return None


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (elements of every parameter tensor)."""
    return int(sum(p.numel() for p in module.parameters()))


def count_nonzero(module: nn.Module) -> int:
    """Number of non-zero parameter elements."""
    return int(sum(int(torch.count_nonzero(p.detach())) for p in module.parameters()))


def gzip_size(paths: Sequence[str | Path], level: int = 6) -> int:
    """Bytes after gzip (``level`` 6) of the given files, concatenated: what zeroed weights save."""
    data = b"".join(Path(p).read_bytes() for p in paths)
    return len(gzip.compress(data, compresslevel=level, mtime=0))


def _example_args(ctx: ModelContext) -> tuple:
    return tuple(torch.from_numpy(v) for v in ctx.spec.example_inputs().values())


def structured_prune(module: nn.Module, example_args: tuple, sparsity: float, importance: str = "l2",
                     round_to: int | None = None) -> tuple[nn.Module, dict]:
    """Remove channels / hidden units in place with torch-pruning's dependency graph.

    Args:
        module: FP32 ``nn.Module`` (modified in place; pass a copy to keep the original).
        example_args: example inputs for tracing, in ``forward()`` order.
        sparsity: fraction in (0, 1) of channels removed from every prunable layer
            (``MetaPruner(pruning_ratio=sparsity)``); output layers keep their width.
        importance: ``"l2"`` or ``"l1"`` group magnitude (``MagnitudeImportance(p)``).
        round_to: keep channel counts multiples of this (SIMD-friendly), or ``None``.

    Returns:
        ``(module, info)``; ``info`` has ``layers`` (name -> ``[before, after]`` widths),
        ``parameters_before``, ``parameters``, ``ignored_output_layers``.

    Raises:
        StageError: the architecture cannot be pruned here (the message says why) or nothing was removed.
    """
    tp = _tp()
    if not 0.0 < sparsity < 1.0:
        raise StageError(f"sparsity {sparsity} is outside (0, 1); give a fraction such as 0.5")
    if importance not in IMPORTANCE_CRITERIA:
        raise StageError(f"unknown importance '{importance}'; use one of {', '.join(IMPORTANCE_CRITERIA)}")
    why = why_not_structured(module)
    if why:
        raise StageError(f"cannot prune {type(module).__name__} structurally: {why}; use unstructured pruning")
    before = count_parameters(module)
    widths0 = _widths(module)
    custom = _customized_pruners()
    support = arch_support(module)
    if support and support.prepare:
        support.prepare(module)
    extra = dict(support.pruner_kwargs(module, sparsity)) if support else {}
    try:
        dg = tp.DependencyGraph().build_dependency(module, example_inputs=example_args, customized_pruners=custom,
                                                   output_transform=extra.get("output_transform"), verbose=False)
    except Exception as e:
        raise StageError(f"torch-pruning cannot trace {type(module).__name__}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}; use unstructured pruning") from None
    outs = output_layers(dg)
    ignored = list(outs) + list(extra.pop("ignored_layers", []))
    pruner = tp.pruner.MetaPruner(
        module, example_args, importance=_importance(IMPORTANCE_CRITERIA[importance]), pruning_ratio=float(sparsity),
        ignored_layers=ignored, round_to=round_to, customized_pruners=custom,
        root_module_types=[nn.modules.conv._ConvNd, nn.Linear, *RNN_TYPES], **extra)
    pruner.step()
    if support and support.finish:
        support.finish(module)
    after = count_parameters(module)
    if after >= before:
        if len(outs) >= sum(1 for m in module.modules() if isinstance(m, PRUNABLE_TYPES)):
            raise StageError(f"cannot prune {type(module).__name__} structurally: every Conv/Linear/RNN layer produces "
                             "a model output, so removing its channels would change the output shape; use unstructured "
                             "pruning")
        raise StageError(f"sparsity {sparsity} removed no channel from {type(module).__name__} (its layers are too "
                         "narrow for that fraction); give a larger sparsity")
    widths1 = _widths(module)
    names = {id(m): n for n, m in module.named_modules()}
    return module, {"layers": {k: [widths0[k], widths1.get(k, widths0[k])] for k in widths0 if widths0[k] != widths1.get(k)},
                    "parameters_before": before, "parameters": after,
                    "ignored_output_layers": [names.get(id(m), type(m).__name__) for m in outs]}


def _widths(module: nn.Module) -> dict[str, int]:
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
        elif isinstance(m, RNN_TYPES):
            out[name] = m.hidden_size
    return out


def _weight_params(module: nn.Module) -> list[tuple[nn.Module, str]]:
    params = []
    for m in module.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            params.append((m, "weight"))
        elif isinstance(m, RNN_TYPES):
            params += [(m, n) for n, _ in m.named_parameters(recurse=False) if n.startswith("weight")]
    return params


def unstructured_masks(module: nn.Module, sparsity: float) -> list[tuple[nn.Module, str]]:
    """Attach global L1 (``|w|``) unstructured pruning masks (``torch.nn.utils.prune``) in place.

    Every Conv/Linear weight and every RNN weight matrix competes in one global ranking; biases
    are kept. The masks stay attached (a fine-tune keeps pruned weights at zero) until
    :func:`make_permanent`.

    Raises:
        StageError: sparsity outside (0, 1), or no weight to prune.
    """
    from torch.nn.utils import prune

    if not 0.0 < sparsity < 1.0:
        raise StageError(f"sparsity {sparsity} is outside (0, 1); give a fraction such as 0.5")
    if not isinstance(module, nn.Module) or isinstance(module, (torch.fx.GraphModule, ExportedModule)):
        raise StageError("unstructured pruning needs an nn.Module with Conv/Linear/RNN layers; "
                         "a torch.export program has none")
    params = _weight_params(module)
    if not params:
        raise StageError(f"{type(module).__name__} has no Conv, Linear or RNN weight to prune")
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(sparsity))
    return params


def make_permanent(params: list[tuple[nn.Module, str]]) -> None:
    """``prune.remove`` every mask: the zeros become the weights, the ``*_orig``/``*_mask`` tensors go.

    (Exporting with the hooks attached would store both tensors: double the size.)
    """
    from torch.nn.utils import prune

    for m, n in params:
        prune.remove(m, n)
        if isinstance(m, RNN_TYPES):  # refresh the RNN's flat weight list after the attribute swap
            m._init_flat_weights()


#: Below this many parameters, training runs on one intra-op thread: for such small layers thread
#: start-up and synchronization cost more than they save (measured 2x slower on 2 shared cores).
SINGLE_THREAD_TRAIN_PARAMS = 2_000_000


@contextlib.contextmanager
def train_threads(module: nn.Module):
    """Run the body with one torch intra-op thread for small models (see :data:`SINGLE_THREAD_TRAIN_PARAMS`)."""
    before = torch.get_num_threads()
    if count_parameters(module) < SINGLE_THREAD_TRAIN_PARAMS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finetune(ctx: ModelContext, module: nn.Module, steps: int, lr_factor: float = FINETUNE_LR_FACTOR) -> dict:
    """Short fine-tune with the spec's own seeded training loop and training split.

    ``steps`` optimizer steps are rounded to whole epochs of the recipe's batch size; the learning
    rate is the recipe's times ``lr_factor`` (cosine decay, AdamW, as in training).

    Returns:
        ``{"steps", "epochs", "lr", "train_s", "final_loss"}``, or ``{"skipped": reason}`` when the
        model has no recipe or no training data (e.g. a user model).
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
    if spec.train is None or spec.recipe is None or ds is None or ds.train.targets is None:
        return {"skipped": "the model has no training recipe or labeled training data"}
    bs = int(spec.recipe.get("batch_size", 32))
    per_epoch = math.ceil(len(ds.train) / bs)
    epochs = max(1, round(steps / per_epoch))
    recipe = {**spec.recipe, "epochs": epochs, "lr": float(spec.recipe["lr"]) * lr_factor}
    with train_threads(module):
        stats = spec.train(module, ds, recipe)
    module.eval()
    return {"steps": epochs * per_epoch, "epochs": epochs, "lr": recipe["lr"], **stats}


def _metric(ctx: ModelContext, module: nn.Module) -> float | None:
    from ..runtimes.session import TorchSession
    from .evaluate import evaluate

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
    from ..models.train import save_weights

    arch = arch_of(module)
    if ctx.spec.build is not None and ctx.spec.source == "zoo":
        try:
            probe = ctx.fresh_module(arch)
            probe.load_state_dict(module.state_dict(), strict=True)
            save_weights(module, out / "weights.safetensors")
            return ["weights.safetensors"], {"arch": arch}
        except (RuntimeError, TypeError, KeyError):
            pass
    from ..exporters.onnx import _dynamic_shapes

    try:
        ep = torch.export.export(module.eval(), _example_args(ctx), dynamic_shapes=_dynamic_shapes(ctx.spec.inputs))
        torch.export.save(ep, str(out / "model.pt2"))
    except Exception as e:
        raise StageError(f"cannot save the pruned {type(module).__name__}: its architecture is not one build(arch) "
                         f"can express and torch.export failed ({type(e).__name__}); register it with "
                         "register_architecture") from None
    return ["model.pt2"], {"arch": None, "saved_as": "torch.export program (.pt2)"}


class ExportedModule(nn.Module):
    """An ``nn.Module`` around a loaded ``torch.export`` program (``ExportedProgram.module()``).

    The unlifted graph module refuses ``.eval()``/``.train()``; this wrapper accepts them (the program
    was exported in eval mode) so the exporter and sessions can treat it like any module. Its
    ``forward`` takes the program's inputs positionally (tensors) and returns its outputs.
    """

    def __init__(self, program_module: nn.Module):
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> "ExportedModule":
        self.training = mode
        return self

    def forward(self, *args: torch.Tensor) -> Any:
        return self.program(*args)


def load_pt2_module(path: str | Path) -> nn.Module:
    """Load a ``.pt2`` variant written by :func:`save_torch_variant` as an :class:`ExportedModule`.

    ``forward`` gets an explicit signature with one parameter per program input, so that
    ``torch.export`` (inside the ONNX exporter) can match positional ``dynamic_shapes`` to it.
    """
    import inspect

    ep = torch.export.load(str(path))
    n = len(ep.graph_signature.user_inputs)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD

    def forward(self, *args):
        return self.program(*args)

    forward.__signature__ = inspect.Signature([inspect.Parameter("self", kind)] +
                                              [inspect.Parameter(f"input_{i}", kind) for i in range(n)])
    cls = type("ExportedModule", (ExportedModule,), {"forward": forward, "__doc__": ExportedModule.__doc__})
    return cls(ep.module())


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
    module, info = structured_prune(module, _example_args(ctx), sparsity, importance, params.get("round_to"))
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


def export_method(spec: Any) -> str:
    """The export method a model's own report plan uses for its FP32 ONNX variant (``onnx``, or
    ``onnx-kv`` for the GPT decoder's prefill + decode graphs)."""
    plan = spec.plan([]) if spec.plan is not None else []
    return next((e[2] for e in plan if e[1] == "export" and e[4] == "fp32-torch"), "onnx")


def chain_entries(name: str, quantize: Sequence[str] = (), export_method: str = "onnx"
                  ) -> list[tuple[str, str, str, dict, str]]:
    """Plan entries that carry the torch variant ``name`` on: ``NAME-onnx`` (export with
    ``export_method``, parity-checked) and ``NAME-<method>`` for each quantize method (on the ONNX
    model; ``bf16`` on the torch one)."""
    from ..api import QUANT_DEFAULT_PARAMS

    out = [(f"{name}-onnx", "export", export_method, {}, name)]
    for m in quantize:
        parent = name if m == "bf16" else f"{name}-onnx"
        out.append((f"{name}-{m}", "quantize", m, dict(QUANT_DEFAULT_PARAMS.get(m, {})), parent))
    return out


#: Fine-tune steps used in the report's default plan (kept small: the whole default report must
#: build cold in a few minutes on 2 cores). The benchmark and the CLI default use more.
REPORT_FINETUNE_STEPS = 100

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


def zoo_plan(model: str, plan: list) -> list:
    """The report plan of zoo ``model`` with its prune and distill chains appended (see :data:`ZOO_PLANS`).

    Export follow-ons are added only when the plan exports to ONNX, quantize follow-ons only for
    methods the plan already has (``optimize report --methods`` restricts them too).
    """
    from .distill import DEFAULT_TEMPERATURE, distill_entries

    cfg = ZOO_PLANS.get(model)
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


# ---- sweep --------------------------------------------------------------------------------------

def sweep(ctx: ModelContext, sparsities: Sequence[float], method: str = "structured", importance: str = "l2",
          finetune_steps: int = DEFAULT_FINETUNE_STEPS, quantize: str | None = None, batches: Sequence[int] = (1, 32),
          threads: int | None = None, min_time_s: float = 0.5, source: Variant | None = None,
          progress: Callable[[str], None] | None = None) -> list[dict]:
    """Prune at each sparsity, export (parity-checked), optionally quantize; evaluate and time each.

    Args:
        sparsities: fractions in (0, 1); a row with sparsity 0 (the unpruned parent) comes first.
        method: ``structured`` or ``unstructured``.
        quantize: a quantize method applied after export (``int8-static``, ...), or ``None``.
        batches: batch sizes timed (samples per call).

    Returns:
        One dict per sparsity: ``sparsity``, ``variant``, ``parameters``, ``nonzero_parameters``,
        ``size_bytes`` (ONNX, bytes), ``gzip_bytes`` (ONNX, bytes), and per format (``torch``,
        ``onnx``, the quantize method) ``metric`` and ``latency_ms`` (``{batch: p50 ms}``).

    Raises:
        StageError: bad sparsity or method, or an architecture that cannot be pruned.
    """
    for s in sparsities:
        if not 0.0 < float(s) < 1.0:
            raise StageError(f"sparsity {s} is outside (0, 1); give fractions such as 0.25,0.5,0.75")
    variant_name(method, 0.5)
    parent = source or ctx.baseline()
    rows = []
    base_named = parent.stage == "baseline"
    for s in [0.0] + [float(x) for x in sparsities]:
        if s == 0.0:
            tv = parent
        else:
            name = variant_name(method, s) if base_named else f"{parent.name}-{variant_name(method, s)}"
            tv = ctx.build(name, "prune", method,
                           {"sparsity": s, "importance": importance, "finetune_steps": int(finetune_steps)}, parent)
        ov = ctx.build("fp32-onnx" if tv.stage == "baseline" else f"{tv.name}-onnx", "export", export_method(ctx.spec),
                       {}, tv)
        chain = [("torch", tv), ("onnx", ov)]
        if quantize:
            from ..api import QUANT_DEFAULT_PARAMS

            qname = quantize if tv.stage == "baseline" else f"{tv.name}-{quantize}"
            chain.append((quantize, ctx.build(qname, "quantize", quantize, dict(QUANT_DEFAULT_PARAMS.get(quantize, {})), ov)))
        row: dict[str, Any] = {"sparsity": s, "variant": tv.name, "parameters": tv.info.get("parameters"),
                               "nonzero_parameters": tv.info.get("nonzero_parameters", tv.info.get("parameters")),
                               "size_bytes": ov.size_bytes(), "gzip_bytes": gzip_size([Path(ov.dir) / f for f in ov.files]),
                               "metric": {}, "latency_ms": {}}
        measured = measure_variants(ctx, [v for _, v in chain], batches, threads, min_time_s, progress)
        for (label, _), m in zip(chain, measured):
            row["metric"][label] = m["metric"]
            row["latency_ms"][label] = m["latency_ms"]
        if quantize:
            row["size_bytes_" + quantize] = chain[-1][1].size_bytes()
        rows.append(row)
    return rows


def measure_variants(ctx: ModelContext, variants: Sequence[Variant], batches: Sequence[int] = (1, 32),
                     threads: int | None = None, min_time_s: float = 0.5,
                     progress: Callable[[str], None] | None = None) -> list[dict]:
    """Evaluate (held-out metric) and time (p50 ms per batch size) each variant, as the report does.

    Returns:
        One dict per variant: ``variant``, ``parent``, ``format``, ``parameters``, ``size_bytes``,
        ``metric``, ``metric_change`` (against the first variant), ``latency_ms`` ``{batch: p50 ms}``.
    """
    from ..runtimes.benchmark import measure
    from .evaluate import bench_feeds, evaluate

    say = progress or (lambda s: None)
    rows, ref = [], None
    for v in variants:
        say(f"measuring {v.name}")
        sess = ctx.session(v, threads=threads)
        m = evaluate(ctx, sess, None)["metric"]
        ref = m if ref is None else ref
        rows.append({"variant": v.name, "parent": v.parent, "format": v.format, "parameters": v.info.get("parameters"),
                     "size_bytes": v.size_bytes(), "metric": m,
                     "metric_change": None if m is None or ref is None else m - ref,
                     "latency_ms": {str(b): measure(sess, bench_feeds(ctx, b), min_time_s=min_time_s, batch=b).p50_ms
                                    for b in batches}})
    return rows


def publish_variants(variants: Sequence[Variant], dest: str | Path) -> list[Path]:
    """Copy variants out of the cache into the folder ``dest``: ONNX ones as ``NAME.onnx``, torch ones
    as a folder ``NAME/`` with their weights (or ``.pt2``) and ``variant.json`` (architecture, stage
    parameters, what the stage measured). Written atomically.

    Raises:
        OutputPathError: ``dest`` cannot be written.
    """
    from ..api import publish
    from ..utils import ensure_dir, write_json_atomic

    dest = ensure_dir(dest)
    written: list[Path] = []
    for v in variants:
        if v.format == "onnx":
            written += publish(v, dest / f"{v.name}.onnx")
        else:
            written += publish(v, dest / v.name)
            written.append(write_json_atomic(dest / v.name / "variant.json", {**v.to_dict(), "dir": None}))
    return written


def sweep_markdown(rows: list[dict], spec: Any, method: str = "structured") -> str:
    """The sweep as a Markdown table: sparsity against parameters, size, metric and p50 latency."""
    if not rows:
        return ""
    labels = list(rows[0]["metric"])
    batches = list(next(iter(rows[0]["latency_ms"].values())))
    met = spec.metric
    scale = met.scale if met else 1.0
    mname = met.name if met else "metric"
    hdr = ["sparsity", "parameters", "nonzero", "ONNX size", "ONNX gzip"] + [f"{mname} {l}" for l in labels] + \
          [f"p50 ms b{b} {l}" for b in batches for l in labels]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        cells = [f"{r['sparsity']:.2f}", f"{r['parameters']:,}", f"{r['nonzero_parameters']:,}",
                 f"{r['size_bytes']:,} B", f"{r['gzip_bytes']:,} B"]
        cells += ["-" if r["metric"][l] is None else f"{r['metric'][l] * scale:.2f}" for l in labels]
        cells += [f"{r['latency_ms'][l][b]:.3f}" for b in batches for l in labels]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("Structured pruning removes channels: size and dense latency fall." if method == "structured" else
            "Unstructured pruning zeroes weights in dense tensors: size on disk and dense latency do not change; "
            "only the gzip-compressed size shrinks.")
    return "\n".join(lines) + "\n\n" + note + "\n"


_SPARSITY_RE = re.compile(r"^\s*\d*\.?\d+\s*(,\s*\d*\.?\d+\s*)*$")


def parse_sparsities(text: str) -> list[float]:
    """``"0.25,0.5,0.75"`` -> ``[0.25, 0.5, 0.75]``.

    Raises:
        StageError: not comma-separated fractions in (0, 1).
    """
    if not _SPARSITY_RE.match(text or ""):
        raise StageError(f"bad --sparsity '{text}'; give fractions in (0, 1) such as 0.5 or 0.25,0.5,0.75")
    vals = [float(x) for x in text.split(",")]
    bad = [v for v in vals if not 0.0 < v < 1.0]
    if bad:
        raise StageError(f"sparsity {bad[0]} is outside (0, 1); give fractions such as 0.25,0.5,0.75")
    return vals


def prunable(ctx: ModelContext, method: str = "structured", source: Variant | None = None) -> None:
    """Check up front that ``ctx``'s model (or its torch variant ``source``) can be pruned with ``method``.

    Raises:
        StageError: the model is ONNX-only, ``source`` is not a torch variant, the method is unknown,
            or the architecture cannot be pruned structurally (the message says why).
    """
    variant_name(method, 0.5)
    if not ctx.has_torch:
        raise StageError(f"cannot prune '{ctx.spec.name}': it is an ONNX file and pruning works on the torch model; "
                         "give the torch model (zoo name, package.module:factory)")
    if source is not None and source.format != "torch":
        raise StageError(f"cannot prune '{source.name}': it is {source.format}; prune the torch model, then export")
    if method == "structured":
        # the architecture is all that matters here: an untrained module avoids loading (or training) weights
        module = ctx.fresh_module() if source is None or source.stage == "baseline" else ctx.torch_session(source).module
        why = why_not_structured(module)
        if why:
            raise StageError(f"cannot prune '{ctx.spec.name}' structurally: {why}; use --unstructured")


def rows_to_json(rows: list[dict]) -> list[dict]:
    """The sweep rows with NumPy scalars made plain (for JSON)."""
    def conv(o):
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, np.generic):
            return o.item()
        return o

    return [conv(r) for r in rows]
