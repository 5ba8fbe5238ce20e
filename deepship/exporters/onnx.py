"""torch -> ONNX with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``).

What this adds over a bare ``torch.onnx.export`` call:

- dynamic dims come from the spec's *named* dims (``batch``, ``seq``), passed as
  ``dynamic_shapes`` (keyed positionally, so ``forward()`` argument names need not match);
- the written graph is checked for dims the exporter silently fixed (it does so when the code needs
  a concrete size, e.g. a Python loop over time), which is reported as an error with the fix;
- the model is saved as one file below 1.8 GB (external data ``NAME.onnx.data`` above), so it can be
  renamed and moved; size on disk counts both files;

Parity against PyTorch (at the example shape and at a second one, in ONNX Runtime) is the pipeline's
comparator, :mod:`deepship.pipeline.parity`: exporters write graphs and never run them.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import ExportError
from ..models.spec import ModelSpec, TensorSpec
from ..models.train import eval_mode
from ..utils import atomic_dir

DEFAULT_OPSET = 18
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)


@dataclass
class ExportResult:
    """Result of :func:`export_onnx`.

    Attributes:
        path: the ``.onnx`` file.
        files: every file of the model (``.onnx`` plus external data, if any).
        opset: the default-domain opset.
        parity: ``{"example": {...}, "second_shape": {...}}`` each with ``max_abs``, ``max_rel``, ``shape``,
            filled in by :func:`deepship.pipeline.parity.parity` (empty as the exporter returns it).
        dynamic_dims: ``{input: {axis: name}}`` as written in the graph.
    """

    path: Path
    files: list[Path]
    opset: int
    parity: dict[str, Any] = field(default_factory=dict)
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)


def dynamic_shapes(inputs: Sequence[TensorSpec]):
    """``torch.export`` ``dynamic_shapes`` (one entry per input, positional) from the specs' named dims;
    one ``Dim`` per name, so inputs sharing a name share the size."""
    import torch

    dims: dict[str, Any] = {}
    out = []
    for t in inputs:
        d = {}
        for ax, name in t.dynamic_dims.items():
            if name not in dims:
                dims[name] = torch.export.Dim(re.sub(r"\W", "_", name), min=1, max=2**20)
            d[ax] = dims[name]
        out.append(d or None)
    return tuple(out)


_OP_PATTERNS = [r"(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", r"(torch\.ops\.[A-Za-z0-9_.]+)",
                r"(prim[.:]{1,2}[A-Za-z0-9_]+)"]


def _explain_export_failure(exc: BaseException, log: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{exc}\n{log}")
    op = None
    for pat in _OP_PATTERNS:
        m = re.search(pat, text)
        if m:
            op = m.group(1)
            break
    if "Failed to convert the exported program" in text:
        why = "it has no ONNX translation at this opset"
        hint = ("rewrite it with supported ops, register a translation (torch.onnx.export(custom_translation_table=...)), "
                "or try a newer --opset")
    elif "Failed to export the model with torch.export" in text or "torch.export" in text:
        why = "torch.export could not trace it"
        hint = ("replace data-dependent Python control flow with tensor ops (torch.where, torch.cond, cumsum), "
                "or save a torch.export .pt2 yourself and export that")
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        why = first[:160]
        hint = "check the model runs in eval mode on the example inputs, or try a newer --opset"
    where = f"operator {op}" if op else "an unsupported construct"
    return f"ONNX export failed at {where}: {why}; {hint}"


def _fixed_dims(model_proto, inputs: Sequence[TensorSpec]) -> list[str]:
    bad = []
    by_name = {i.name: i for i in model_proto.graph.input}
    for t in inputs:
        gi = by_name.get(t.name)
        if gi is None:
            continue
        dims = gi.type.tensor_type.shape.dim
        for ax, name in t.dynamic_dims.items():
            if ax < len(dims) and not dims[ax].dim_param:
                bad.append(f"dim '{name}' (axis {ax}) of input '{t.name}' to {dims[ax].dim_value}")
    return bad


def _clear_rnn_dispatch_caches() -> None:
    """torch 2.13: the exporter swaps in a while_loop LSTM/GRU decomposition (a py_kernel) for each
    export, but the ops keep a dispatch cache from the previous export, so a second RNN export in one
    process unrolls the time loop and fixes the sequence length. Clearing the caches keeps every export
    dynamic (the fixed-dim check below would otherwise reject the second export)."""
    import torch

    for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input):
        cache = getattr(op, "_dispatch_cache", None)
        if cache is not None:
            cache.clear()


#: the oldest default-domain opset the dynamo exporter writes reliably: it implements 18 and converts
#: down with ONNX's version converter, which fails for common ops (Gemm, LSTM) below 17
MIN_OPSET = 17


def check_opset(opset: int) -> int:
    """``opset`` if it is one the exporter can write (:data:`MIN_OPSET` up to this onnx's newest).

    Raises:
        ExportError: an opset outside that range, with the range.
    """
    import onnx.defs

    top = onnx.defs.onnx_opset_version()
    if int(opset) != opset or not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset {opset} is not one the exporter can write (torch {_torch_version()}, onnx {onnx.__version__}); "
                          f"use --opset {MIN_OPSET} to {top} "
                          f"(default {DEFAULT_OPSET})")
    return int(opset)


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def check_runs(model: Any, args: tuple, spec: ModelSpec) -> None:
    """Run ``model`` once eagerly at the example inputs, so a model that cannot take them (a wrong
    ``--input`` shape, a missing input) fails with its own error instead of the exporter's.

    Raises:
        ExportError: naming the input shapes and the model's first error line.
    """
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(*args)
    except Exception as e:
        shapes = ", ".join(f"{t.name}{list(a.shape)}:{t.dtype}" for t, a in zip(spec.inputs, args))
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise ExportError(f"the model fails on its example inputs {shapes}: {type(e).__name__}: {first[:200]}; "
                          f"check that --input ({', '.join(t.describe() for t in spec.inputs)}) is what forward() "
                          "takes") from None


@contextlib.contextmanager
def _torch_log_captured():
    """Collect torch's log records during an export in a buffer (for the error message) instead of
    printing them on stderr; ``DEEPSHIP_VERBOSE=1`` (``optimize --verbose``) prints them too."""
    import os

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    lg = logging.getLogger("torch")
    verbose = bool(os.environ.get("DEEPSHIP_VERBOSE"))
    # torch gives several of its loggers their own stderr handler: silence them all for the export
    named = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
             if n == "torch" or n.startswith("torch.")]
    saved = [(x, list(x.handlers), x.propagate, x.level) for x in named]
    if not verbose:
        for x in named:
            x.handlers = []
        lg.propagate = False
        lg.setLevel(logging.WARNING)
    lg.addHandler(handler)
    try:
        yield buf
    finally:
        lg.removeHandler(handler)
        for x, h, prop, lvl in saved:
            x.handlers, x.propagate = h, prop
            x.setLevel(lvl)


def export_onnx(model: Any, spec: ModelSpec, out_path: str | Path, opset: int = DEFAULT_OPSET) -> ExportResult:
    """Export ``model`` (eval mode) to ``out_path`` and check that every named dynamic dim stayed dynamic.

    Args:
        model: ``torch.nn.Module`` whose ``forward`` takes ``spec.inputs`` positionally.
        spec: the model's spec (input names, dtypes, named dynamic dims, output names).
        out_path: destination ``.onnx`` file; written atomically (temp folder, then rename).
        opset: default-domain opset (18 unless given).

    Returns:
        :class:`ExportResult`.

    Raises:
        ExportError: the model fails on its example inputs, the exporter failed (naming the operator or
            module), or a dynamic dim was fixed.
    """
    import onnx
    import torch

    out_path = Path(out_path)
    check_opset(opset)
    model = eval_mode(model)
    ex = spec.example_inputs()
    args = tuple(torch.from_numpy(ex[t.name]) for t in spec.inputs)
    check_runs(model, args, spec)
    # torch sets its loggers' levels when torch.onnx is imported; the registry warns about every
    # missing torchvision op on each export, which says nothing about the user's model
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    _clear_rnn_dispatch_caches()
    with tempfile.TemporaryDirectory() as td, _torch_log_captured() as log:
        raw = Path(td) / "raw.onnx"
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
                warnings.simplefilter("ignore")
                prog = torch.onnx.export(
                    model, args, dynamo=True, dynamic_shapes=dynamic_shapes(spec.inputs),
                    opset_version=opset, input_names=[t.name for t in spec.inputs],
                    output_names=list(spec.output_names), optimize=True, verbose=False,
                )
                prog.save(str(raw))
        except Exception as e:
            raise ExportError(_explain_export_failure(e, log.getvalue())) from None
        mp = onnx.load(str(raw))
        wrote = next((o.version for o in mp.opset_import if o.domain in ("", "ai.onnx")), None)
        if wrote != opset:
            raise ExportError(f"the exporter cannot write opset {opset} for this model (it wrote {wrote}: its "
                              f"version converter failed); use --opset {wrote} or a newer one")
        fixed = _fixed_dims(mp, spec.inputs)
        if fixed:
            raise ExportError(
                f"the exporter fixed {fixed[0]}: the model needs a concrete size there (e.g. a Python loop over "
                "time); use cumsum/scan tensor formulations, or declare that dim static in the input spec")
        mp.producer_name = "deepship"
        files = save_onnx(mp, out_path)
    return ExportResult(out_path, files, opset,
                        dynamic_dims={t.name: t.dynamic_dims for t in spec.inputs if t.dynamic_dims})


def save_onnx(model_proto, out_path: str | Path) -> list[Path]:
    """Save a ModelProto atomically: one file below 1.8 GB, else ``NAME.onnx`` + ``NAME.onnx.data``.

    Returns the list of files written.
    """
    import onnx

    out_path = Path(out_path)
    big = model_proto.ByteSize() > EXTERNAL_DATA_THRESHOLD if hasattr(model_proto, "ByteSize") else False
    stage = out_path.parent / f".{out_path.name}.staging"
    with atomic_dir(stage) as td:
        tmp = td / out_path.name
        if big:
            onnx.save_model(model_proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=out_path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model_proto, str(tmp))
    files = []
    # move the staged files into place: data file first so the .onnx never points at nothing
    for f in sorted(stage.iterdir(), key=lambda p: p.suffix == ".onnx"):
        dest = out_path.parent / f.name
        f.replace(dest)
        files.append(dest)
    if not big:
        (out_path.parent / (out_path.name + ".data")).unlink(missing_ok=True)
    stage.rmdir()
    return files
