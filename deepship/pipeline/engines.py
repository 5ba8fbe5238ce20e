"""The ``engine`` stage: one per backend of :mod:`deepship.runtimes.engines`, built from a variant.

For each registered backend this module registers ``("engine", NAME)`` (consumes the backend's
format, produces ``engine:NAME``). The stage hands the backend a
:class:`~deepship.runtimes.engines.BuildSource`: the parent's file or torch module, the spec, and
calibration samples on demand (so the data's identity is part of the stage's cache key). What is
pipeline work stays here: which variant an engine is built from (:func:`engine_source`: the FP16 or
INT8 QDQ ONNX model for an ONNX Runtime engine at that precision, the FP16 model for TensorRT-RTX)
and TensorRT's INT8 QDQ source, made with ONNX Runtime's static quantizer (symmetric activations,
:data:`deepship.runtimes.engines.tensorrt.qdq_recipe`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..runtimes.engines import BuildSource, EngineBackend, backends, get_backend, register_backend
from ..runtimes.engines.providers import resolve_providers
from ..runtimes.engines.tensorrt import import_tensorrt, qdq_recipe
from ..utils import stable_hash
from . import quantize as Q
from .context import CALIBRATION_SAMPLES, ModelContext
from .export import onnx_parent
from .stages import is_registered, register_stage
from .variants import Variant


def engine_stage(name: str):
    """The stage function of backend ``name``: ``(ctx, parent, params, out) -> (files, info)``."""

    def run(ctx: ModelContext, parent: Variant, params: dict, out: Path):
        backend = get_backend(name)
        precision = params.get("precision", "fp32")
        n = int(params.get("samples", CALIBRATION_SAMPLES))
        with tempfile.TemporaryDirectory() as td:
            src = BuildSource(name=parent.name, precision=parent.precision, spec=ctx.spec, path=parent.path,
                              module=ctx.torch_session(parent).module if parent.format == "torch" else None,
                              calibration=lambda: ctx.calibration(n), dataset=ctx.dataset(),
                              key=stable_hash([parent.key, ctx.data_key(), n]))
            pre: dict[str, Any] = {}
            if (name == "tensorrt" and precision == "int8" and parent.precision == "fp32"
                    and params.get("calibration", "qdq") == "qdq"):
                calib, desc = ctx.calibration(n)
                qdq = Path(td) / "model.qdq.onnx"
                q = Q.int8_static(Path(parent.path), qdq, calib, method="minmax", **qdq_recipe)
                src.path, src.precision = qdq, "int8"
                pre = {"calibration_data": desc, "qdq": {k: q[k] for k in ("nodes", "calibration") if k in q}}
            files, info = backend.build(src, out, precision, params)
        info = {**pre, **info, "backend": name}
        # ONNX Runtime runs the graph's own precision; other backends build the one asked for
        info["precision"] = info.get("precision", parent.precision if name == "onnxruntime" else precision)
        return files, info

    run.__doc__ = f"engine build with the {name} backend"
    return run


def register_engine_stages() -> None:
    """Register ``("engine", NAME)`` for every backend that has no stage yet (idempotent)."""
    for name, b in backends().items():
        if not is_registered("engine", name):
            register_stage("engine", name, b.consumes, f"engine:{name}", uses_data=True)(engine_stage(name))


def register_engine(backend: EngineBackend) -> EngineBackend:
    """Add an engine backend (:func:`deepship.runtimes.engines.register_backend`) and its ``engine``
    stage in one call; ``optimize engine --backend NAME`` and :func:`deepship.api.engine` then build it."""
    register_backend(backend)
    register_engine_stages()
    return backend


def engine_source(ctx: ModelContext, backend: str, precision: str, params: dict) -> Variant:
    """The variant an engine of ``backend`` at ``precision`` is built from (built if needed).

    - ``onnxruntime``: the FP32 ONNX model for FP32 (and for FP16 on the TensorRT EP, which casts
      itself), else the FP16 or the INT8 static QDQ ONNX variant (ONNX Runtime takes the precision
      from the graph);
    - ``tensorrt``: the FP32 ONNX model, or the FP16 ONNX variant on TensorRT-RTX (strongly typed);
    - torch backends (``inductor``): the FP32 torch model; other ONNX backends: the FP32 ONNX model.
    """
    b = get_backend(backend)
    if b.consumes == "torch":
        return ctx.baseline()
    if backend == "onnxruntime" and precision != "fp32":
        trt_first = resolve_providers(params.get("providers"))[0] == "TensorrtExecutionProvider"
        if not (precision == "fp16" and trt_first):
            return Q.quantize_variant(ctx, "fp16" if precision == "fp16" else "int8-static")
    if backend == "tensorrt" and precision == "fp16" and import_tensorrt()[1] == "tensorrt_rtx":
        return Q.quantize_variant(ctx, "fp16")
    return onnx_parent(ctx)


register_engine_stages()
