"""Bring your own model: ``package.module:factory`` (+ weights), a ``torch.export`` ``.pt2`` file, or an
``.onnx`` file (your data: :mod:`deepship.models.userdata`).

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import importlib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..errors import InputSpecError, UnknownModelError, WeightsError
from ..utils import check_onnx_file, sha256_file
from .spec import ModelSpec, TensorSpec, parse_input_spec

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory_ref(ref: str) -> bool:
    return bool(_FACTORY_RE.match(ref))


def _import_factory(ref: str) -> Callable[[], Any]:
    mod_name, fn_name = ref.split(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UnknownModelError(f"cannot import module '{mod_name}' for model '{ref}': {e}; "
                                "run from the folder that holds it or install it") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise UnknownModelError(f"'{fn_name}' in module '{mod_name}' is not a callable factory; "
                                "give package.module:function returning an nn.Module")
    return fn


def _source_hash(fn: Callable) -> str:
    """SHA-256 of the file that defines ``fn`` (an edited model class is a different model), or ``-``."""
    import inspect

    try:
        src = inspect.getsourcefile(fn)
    except TypeError:
        src = None
    return sha256_file(src) if src and Path(src).is_file() else "-"


def factory_spec(ref: str, inputs: Sequence[str | TensorSpec], weights: str | None = None,
                 output_names: Sequence[str] | None = None, name: str | None = None) -> ModelSpec:
    """Spec for ``package.module:factory``: ``factory()`` returns an ``nn.Module``.

    Args:
        inputs: input specs (``x:float32[batch,3,32,32]`` or :class:`TensorSpec`), one per
            ``forward()`` argument, in order. Required.
        weights: optional safetensors or torch state_dict checkpoint, loaded strictly.

    Raises:
        UnknownModelError, InputSpecError, WeightsError.
    """
    from .train import load_weights

    fn = _import_factory(ref)
    if not inputs:
        raise InputSpecError(f"model '{ref}' needs an input spec; pass --input NAME:DTYPE[dims], "
                             "e.g. --input x:float32[batch,3,32,32]")
    specs = [i if isinstance(i, TensorSpec) else parse_input_spec(i) for i in inputs]

    def build(arch: Any = None) -> Any:
        m = fn()
        if not hasattr(m, "state_dict"):
            raise UnknownModelError(f"factory '{ref}' returned {type(m).__name__}, not a torch.nn.Module")
        if weights:
            load_weights(m, weights)
        return m.eval()

    if weights and not Path(weights).is_file():
        raise WeightsError(f"weights file {weights} not found; check the path given to --weights")
    ident = hashlib.sha256("|".join([ref, sha256_file(weights) if weights else "-", _source_hash(fn)]).encode()).hexdigest()[:16]
    return ModelSpec(name=name or ref.split(":")[-1], task="other", build=build, inputs=specs,
                     output_names=list(output_names or ["output"]), weights_path=weights, source="factory",
                     description=f"user model {ref}" + (f" with weights {Path(weights).name}" if weights else ""),
                     extra={"identity": ident, "ref": ref})


def pt2_spec(path: str, inputs: Sequence[str | TensorSpec] | None = None, name: str | None = None) -> ModelSpec:
    """Spec for a ``torch.export`` program saved with ``torch.export.save`` (``.pt2``).

    Input specs default to the program's placeholders: symbolic dims become dynamic (axis 0 is
    named ``batch``, others ``dim<axis>``).

    Raises:
        UnknownModelError: missing or unreadable file.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise UnknownModelError(f"model file {p} not found; check the path")
    try:
        ep = torch.export.load(str(p))
    except Exception as e:
        raise UnknownModelError(f"cannot load {p} as a torch.export program ({type(e).__name__}); "
                                "save it with torch.export.save") from None
    if inputs:
        specs = [i if isinstance(i, TensorSpec) else parse_input_spec(i) for i in inputs]
    else:
        specs = []
        user_inputs = ep.graph_signature.user_inputs
        for node in ep.graph.nodes:
            if node.op == "placeholder" and node.name in user_inputs:
                val = node.meta.get("val")
                dims = tuple(int(d) if isinstance(d, int) or str(d).isdigit() else ("batch" if ax == 0 else f"dim{ax}")
                             for ax, d in enumerate(val.shape))
                specs.append(TensorSpec(node.name, dims, str(val.dtype).replace("torch.", "")))
    outs = [s.arg.name if hasattr(s.arg, "name") else f"output_{i}" for i, s in enumerate(ep.graph_signature.output_specs)]

    def build(arch: Any = None) -> Any:
        return torch.export.load(str(p)).module()

    return ModelSpec(name=name or p.stem, task="other", build=build, inputs=specs,
                     output_names=[f"output_{i}" if len(outs) > 1 else "output" for i in range(len(outs))],
                     source="pt2", description=f"torch.export program {p.name}",
                     extra={"identity": sha256_file(p)[:16], "path": str(p)})


_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 2: "uint8", 3: "int8", 11: "float64"}


def onnx_spec(path: str, name: str | None = None) -> ModelSpec:
    """Spec for an existing ONNX file; dims with a ``dim_param`` (or none) are dynamic.

    Raises:
        ArtifactError: missing or corrupt file, missing external data.
    """
    import onnx

    check_onnx_file(path)
    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    specs = []
    for gi in m.graph.input:
        if gi.name in init:
            continue
        tt = gi.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else (int(d.dim_value) if d.dim_value else f"dim{ax}")
                     for ax, d in enumerate(tt.shape.dim))
        specs.append(TensorSpec(gi.name, dims, _ONNX_DTYPES.get(tt.elem_type, "float32")))
    return ModelSpec(name=name or Path(path).stem, task="other", build=None, inputs=specs,
                     output_names=[o.name for o in m.graph.output], onnx_path=str(path), source="onnx",
                     description=f"ONNX model {Path(path).name}", extra={"identity": sha256_file(path)[:16]})


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

    import torch

    ep = torch.export.load(str(path))
    n = len(ep.graph_signature.user_inputs)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD

    def forward(self, *args):
        return self.program(*args)

    forward.__signature__ = inspect.Signature([inspect.Parameter("self", kind)] +
                                              [inspect.Parameter(f"input_{i}", kind) for i in range(n)])
    cls = type("ExportedModule", (ExportedModule,), {"forward": forward, "__doc__": ExportedModule.__doc__})
    return cls(ep.module())
