"""Structured pruning with torch-pruning (LSTM/GRU hidden units included) and unstructured magnitude
pruning with ``torch.nn.utils.prune``, on plain ``nn.Module`` objects (no variants, no cache).

torch-pruning: ``DependencyGraph`` + ``MetaPruner`` (Fang et al. 2023, "DepGraph: Towards Any
Structural Pruning"), with a custom single-layer RNN pruner and an RNN-aware group magnitude importance.
"""
from __future__ import annotations

import contextlib
import gzip
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ...errors import StageError
from ...utils import first_line
from ...models.user import ExportedModule
from .archs import arch_support

PRUNE_METHODS = ("structured", "unstructured")
IMPORTANCE_CRITERIA = {"l1": 1, "l2": 2}
RNN_TYPES = (nn.LSTM, nn.GRU, nn.RNN)
_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}
PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear) + RNN_TYPES

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
                         f"{first_line(e, 160)}; use unstructured pruning") from None
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
