"""The stages behind one registry.

A stage implementation is registered for a ``(stage, method)`` pair and declares the format it
consumes and the one it produces (the Olive "pass" idea: each pass registers itself and declares
its configuration). :func:`check_chain` uses those declarations to reject an impossible chain
before anything runs.

| stage | method | consumes -> produces |
|---|---|---|
| export | onnx | torch -> onnx |
| quantize | int8-dynamic, int8-static, fp16, int4-weight-only | onnx -> onnx |
| quantize | bf16 | torch -> torch |
| engine | onnxruntime | onnx -> engine:onnxruntime |
| engine | inductor | torch -> engine:inductor |
| engine | tensorrt | onnx -> engine:tensorrt |
| prune | structured, unstructured | torch -> torch (:mod:`deepship.pipeline.prune`) |
| distill | kd | torch -> torch (:mod:`deepship.pipeline.distill`) |
| export | onnx-kv | torch -> onnx (decoders with a KV cache, :mod:`deepship.pipeline.arch.gpt`) |
| optimize | ort-transformers | onnx -> onnx (:mod:`deepship.pipeline.transformers`) |
| quantize | int8-transformer | onnx -> onnx (:mod:`deepship.pipeline.transformers`) |

The implementations live beside what they use (:mod:`.export`, :mod:`.quantize`, :mod:`.engines`,
:mod:`.prune`, :mod:`.distill`, :mod:`.transformers`, the family adapters in :mod:`.arch`) and
register themselves when imported; :mod:`deepship.pipeline` imports them all. A stage function is
``fn(ctx, parent, params, out_dir) -> (file names, info)`` with ``ctx`` a
:class:`~deepship.pipeline.context.ModelContext`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import StageError


@dataclass
class StageImpl:
    """One registered stage implementation.

    ``fn(ctx, parent, params, out_dir) -> (file names, info)`` builds into ``out_dir``.
    ``uses_data``: the stage reads the model's data (calibration, fine-tuning, distillation), so the
    data's identity is part of its cache key.
    """

    stage: str
    method: str
    consumes: str
    produces: str
    precision: str
    fn: Callable[..., tuple[list[str], dict]]
    doc: str = ""
    uses_data: bool = False


_STAGES: dict[tuple[str, str], StageImpl] = {}

#: modules of :mod:`deepship.pipeline` whose stages register when imported (loaded on the first lookup)
BUILTIN_MODULES = ("export", "quantize", "engines", "prune", "distill", "transformers", "finetune")
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for m in BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{m}")


def register_stage(stage: str, method: str, consumes: str, produces: str, precision: str = "fp32",
                   uses_data: bool = False):
    """Decorator registering ``fn`` as the implementation of ``(stage, method)``; ``uses_data`` for
    stages that read the model's data (their cache key then covers it)."""

    def deco(fn):
        _STAGES[(stage, method)] = StageImpl(stage, method, consumes, produces, precision, fn,
                                             (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
                                             uses_data)
        return fn

    return deco


def get_stage(stage: str, method: str) -> StageImpl:
    """Raises :class:`StageError` for an unknown pair, listing the known methods of ``stage``."""
    _load_builtins()
    if (stage, method) not in _STAGES:
        known = sorted(m for s, m in _STAGES if s == stage)
        if not known:
            raise StageError(f"unknown stage '{stage}'; stages are {', '.join(sorted({s for s, _ in _STAGES}))}")
        raise StageError(f"unknown {stage} method '{method}'; use one of {', '.join(known)}")
    return _STAGES[(stage, method)]


def stages() -> list[StageImpl]:
    """Every registered stage implementation."""
    _load_builtins()
    return list(_STAGES.values())


def is_registered(stage: str, method: str) -> bool:
    """Whether ``(stage, method)`` has an implementation (without loading the built-in modules)."""
    return (stage, method) in _STAGES


def check_chain(start_format: str, chain: Sequence[tuple[str, str]]) -> str:
    """Check that ``chain`` of ``(stage, method)`` can run from ``start_format``; return the end format.

    Raises:
        StageError: naming the first step whose input format does not match.
    """
    fmt = start_format
    for stage, method in chain:
        impl = get_stage(stage, method)
        if impl.consumes != fmt:
            raise StageError(f"{stage} {method} consumes a {impl.consumes} model but gets {fmt}; "
                             + ("export to ONNX first" if impl.consumes == "onnx" else "start from the torch model"))
        fmt = impl.produces
    return fmt
