"""The Python API: the same operations as the ``optimize`` command, from code.

Example::

    import deepship as ds

    ctx = ds.load("cnn")                                  # zoo model, trained weights from cache
    onnx_v = ds.export(ctx)                               # FP32 ONNX, parity-checked
    q = ds.quantize(ctx, "int8-static", calibration="entropy")
    print(q.info["nodes"], q.size_bytes())
    report = ds.report(["cnn", "lstm"], out_dir="report") # the whole variant tree, measured

    # your own model: factory + weights + input spec, labeled data for the metric
    ctx = ds.load("mypkg.models:make_net", inputs=["x:float32[batch,3,32,32]"],
                  weights="net.safetensors", data="val.npz")
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import OutputPathError, StageError
from .models import resolve
from .models.spec import ModelSpec
from .pipeline.stages import ModelContext
from .pipeline.variants import Variant
from .utils import atomic_dir, atomic_file, ensure_dir

QUANT_DEFAULT_PARAMS = {
    "int8-static": {"calibration": "minmax", "per_channel": True},
    "int4-weight-only": {"block_size": 32},
}


def load(ref: str | ModelSpec, inputs: Sequence[str] | None = None, weights: str | None = None,
         data: str | None = None, metric: str | None = None, evaluate: Callable[[Any], float] | None = None,
         output_names: Sequence[str] | None = None, retrain: bool = False) -> ModelContext:
    """Resolve a model reference (see :func:`deepship.models.resolve`) into a :class:`ModelContext`."""
    spec = ref if isinstance(ref, ModelSpec) else resolve(ref, inputs=inputs, weights=weights, data=data,
                                                          metric=metric, evaluate=evaluate, output_names=output_names)
    return ModelContext(spec, retrain=retrain)


def _onnx_parent(ctx: ModelContext, opset: int | None = None) -> Variant:
    base = ctx.baseline()
    if base.format == "onnx":
        return base
    return export(ctx, opset=opset)


def export(ctx: ModelContext, opset: int | None = None) -> Variant:
    """FP32 ONNX variant (dynamo exporter, named dynamic dims, parity at two shapes).

    Raises:
        ExportError: export or parity failed; StageError: the model is already ONNX.
    """
    if not ctx.has_torch:
        raise StageError(f"model '{ctx.spec.name}' is already ONNX; nothing to export")
    params = {"opset": opset} if opset else {}
    return ctx.build("fp32-onnx", "export", "onnx", params, ctx.baseline())


def quantize(ctx: ModelContext, method: str, **params: Any) -> Variant:
    """Quantize: ``int8-dynamic``, ``int8-static`` (``calibration=``, ``per_channel=``), ``fp16``,
    ``int4-weight-only`` (``block_size=``) on the FP32 ONNX model, or ``bf16`` on the torch model.

    Raises:
        StageError: unknown method, or ``bf16`` on an ONNX-only model.
    """
    from .pipeline.stages import get_stage

    impl = get_stage("quantize", method)
    p = {**QUANT_DEFAULT_PARAMS.get(method, {}), **{k: v for k, v in params.items() if v is not None}}
    name = method if method != "bf16" else "bf16-torch"
    if method == "int8-static" and p.get("calibration", "minmax") != "minmax":
        name = f"int8-static-{p['calibration']}"
    if impl.consumes == "torch":
        if not ctx.has_torch:
            raise StageError(f"{method} needs a torch model; '{ctx.spec.name}' is ONNX: use fp16 or int8-static")
        return ctx.build(name, "quantize", method, p, ctx.baseline())
    return ctx.build(name, "quantize", method, p, _onnx_parent(ctx))


def engine(ctx: ModelContext, backend: str = "onnxruntime", precision: str = "fp32",
           source: Variant | None = None, **params: Any) -> Variant:
    """Build an engine with ``backend`` from ``source`` (default: the FP32 ONNX variant).

    Raises:
        StageError: unknown or unavailable backend, unsupported precision.
    """
    from .runtimes.engines import get_backend

    b = get_backend(backend)
    ok, why = b.available()
    if not ok:
        raise StageError(why)
    parent = source or (_onnx_parent(ctx) if b.consumes == "onnx" else ctx.baseline())
    name = f"{backend}-engine" + ("" if parent.name in ("fp32-onnx", "fp32-torch") else f"-{parent.name}")
    return ctx.build(name, "engine", backend, {"precision": precision, **params}, parent)


def publish(v: Variant, dest: str | Path) -> list[Path]:
    """Copy a variant's artifact out of the cache to ``dest`` (atomically).

    An ``.onnx`` destination gets the model file (and ``DEST.data`` if it has external data);
    any other destination is a folder that receives every artifact file.

    Raises:
        OutputPathError: ``dest`` cannot be written.
    """
    dest = Path(dest)
    if v.path is None:
        raise OutputPathError(f"variant {v.name} has no file to write")
    if dest.suffix == ".onnx" and v.format == "onnx":
        ensure_dir(dest.parent)
        if len(v.files) > 1:  # external data: re-save so the location inside matches the new name
            import onnx

            from .exporters.onnx import save_onnx

            return save_onnx(onnx.load(str(v.path)), dest)
        with atomic_file(dest) as tmp:
            shutil.copyfile(v.path, tmp)
        return [dest]
    if dest.exists() and not dest.is_dir():
        raise OutputPathError(f"{dest} exists and is not a folder; give a folder or an .onnx path")
    with atomic_dir(dest) as tmp:
        for f in v.files:
            shutil.copyfile(Path(v.dir) / f, tmp / f)
    return [dest / f for f in v.files]


def report(models: Sequence[str | ModelSpec], out_dir: str | Path = "report", **kw: Any) -> dict:
    """Run :func:`deepship.pipeline.report.run_report` on model references or specs."""
    from .pipeline.report import run_report

    specs = [m if isinstance(m, ModelSpec) else resolve(m) for m in models]
    return run_report(specs, out_dir=out_dir, **kw)


def check(report_path: str | Path, baseline_path: str | Path, budgets: str | Path | None = None,
          max_drop: float | None = None, max_rel_drop: float | None = None,
          latency_tolerance: float | None = None):
    """Run the CI gate; returns a :class:`deepship.pipeline.check.GateResult`."""
    from .pipeline.check import Budget, check as _check, load_budgets, load_report

    r, b = load_report(report_path), load_report(baseline_path)
    dflt, per_metric, per_variant = load_budgets(budgets, Budget(max_drop, max_rel_drop, latency_tolerance))
    # flags override the file's [default]
    dflt = Budget(max_drop if max_drop is not None else dflt.max_drop,
                  max_rel_drop if max_rel_drop is not None else dflt.max_rel_drop,
                  latency_tolerance if latency_tolerance is not None else dflt.latency_tolerance)
    return _check(r, b, dflt, per_metric, per_variant)
