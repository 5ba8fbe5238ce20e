"""The ``optimize`` command: parses arguments and calls :mod:`deepship.api`. Nothing else lives here."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import EXIT_USER_ERROR, DeepshipError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="deepship: export, quantize, build engines, benchmark and report trained models.")
out = Console()
err = Console(stderr=True)

MODEL_HELP = "zoo name (mlp, cnn, lstm, gru), package.module:factory, a .pt2 or an .onnx file"
INPUT_HELP = "input spec NAME:DTYPE[dims], dims named for dynamic (x:float32[batch,3,32,32]); repeat per input"


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def user_errors(fn):
    """Print a :class:`DeepshipError` as one line and exit 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        _quiet_libraries()
        try:
            return fn(*a, **kw)
        except DeepshipError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)

    return wrapper


def _load(model: str, inputs, weights, data=None, metric=None, retrain=False):
    from . import api

    return api.load(model, inputs=inputs or None, weights=weights, data=data, metric=metric, retrain=retrain)


@app.command("models")
@user_errors
def models_cmd():
    """List the zoo."""
    from .models.zoo import DEFAULT_SET, ZOO

    for name, mk in ZOO.items():
        s = mk()
        m = f"{s.metric.name} ({'higher' if s.metric.higher_is_better else 'lower'} is better)" if s.metric else "-"
        out.print(f"{name:6s} {'default' if name in DEFAULT_SET else '       '}  {m:28s} {s.description}", highlight=False)


@app.command("train")
@user_errors
def train_cmd(models: List[str] = typer.Argument(None, help="zoo names (default: all)"),
              out_dir: Optional[Path] = typer.Option(None, "--out", help="also write NAME.safetensors here "
                                                     "(deepship/models/weights to refresh the committed weights)")):
    """Run the seeded training recipes (results are cached)."""
    import json as _json

    from .models import resolve
    from .models.train import recipe_hash, save_weights, train_model
    from .models.zoo import ZOO

    for name in models or list(ZOO):
        spec = resolve(name)
        model, stats = train_model(spec)
        msg = f"{name}: trained in {stats['train_s']:.1f} s"
        if out_dir:
            p = save_weights(model, Path(out_dir) / f"{name}.safetensors",
                             {"recipe_hash": recipe_hash(spec), "recipe": _json.dumps(spec.recipe)})
            msg += f" -> {p}"
        out.print(msg, highlight=False)


@app.command("export")
@user_errors
def export_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
               output: Optional[Path] = typer.Option(None, "-o", "--output", help="destination .onnx (default out/MODEL.onnx)"),
               opset: int = typer.Option(18, help="ONNX default-domain opset"),
               inputs: List[str] = typer.Option(None, "--input", help=INPUT_HELP),
               weights: Optional[str] = typer.Option(None, help="safetensors or torch state_dict checkpoint")):
    """Export to ONNX (dynamo exporter) and check parity against PyTorch at a second shape."""
    from . import api
    from .utils import ensure_dir

    dest = output or Path("out") / f"{Path(model).stem if model.endswith(('.pt2', '.onnx')) else model.split(':')[-1]}.onnx"
    ensure_dir(dest.parent)
    ctx = _load(model, inputs, weights)
    v = api.export(ctx, opset=opset)
    files = api.publish(v, dest)
    p = v.info["parity"]
    out.print(f"wrote {', '.join(map(str, files))} (opset {v.info['opset']}, {v.size_bytes():,} bytes)", highlight=False)
    for label in ("example", "second_shape"):
        q = p[label]
        out.print(f"parity at {q['shape']}: max abs {q['max_abs']:.3g}, max rel {q['max_rel']:.3g}", highlight=False)
    dyn = "; ".join(f"{k}: {', '.join(f'axis {a}={n}' for a, n in d.items())}" for k, d in v.info["dynamic_dims"].items())
    out.print(f"dynamic dims: {dyn or 'none'}", highlight=False)


@app.command("quantize")
@user_errors
def quantize_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
                 method: str = typer.Option(..., help="int8-dynamic | int8-static | fp16 | bf16 | int4-weight-only"),
                 calibration: str = typer.Option("minmax", help="int8-static: minmax | percentile | entropy"),
                 per_channel: bool = typer.Option(True, help="int8-static: per-channel weight scales"),
                 block_size: int = typer.Option(32, help="int4-weight-only: block size"),
                 output: Optional[Path] = typer.Option(None, "-o", "--output", help="destination (.onnx, or a folder for bf16)"),
                 inputs: List[str] = typer.Option(None, "--input", help=INPUT_HELP),
                 weights: Optional[str] = typer.Option(None),
                 data: Optional[str] = typer.Option(None, help=".npz with inputs (+ targets); calibration samples")):
    """Quantize a model and say which nodes were quantized."""
    from . import api
    from .pipeline.quantize import describe_nodes
    from .utils import ensure_dir

    params = {"calibration": calibration, "per_channel": per_channel} if method == "int8-static" else \
        {"block_size": block_size} if method == "int4-weight-only" else {}
    stem = Path(model).stem if model.endswith((".pt2", ".onnx")) else model.split(":")[-1]
    dest = output or Path("out") / (f"{stem}-{method}" + ("" if method == "bf16" else ".onnx"))
    ensure_dir(dest.parent)
    ctx = _load(model, inputs, weights, data)
    v = api.quantize(ctx, method, **params)
    files = api.publish(v, dest)
    parent = ctx.get(v.parent)
    out.print(f"wrote {', '.join(map(str, files))}: {v.size_bytes():,} bytes "
              f"({v.size_bytes() / max(parent.size_bytes(), 1):.2f}x of {parent.name})", highlight=False)
    out.print(describe_nodes(v.info.get("nodes", {})), highlight=False)
    if "calibration" in v.info:
        out.print(f"calibration: {v.info['calibration']} on {v.info.get('calibration_data')}", highlight=False)
    if v.info.get("warning"):
        err.print(f"warning: {v.info['warning']}", highlight=False)


@app.command("engine")
@user_errors
def engine_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
               backend: str = typer.Option("onnxruntime", help="engine backend"),
               precision: str = typer.Option("fp32", help="fp32 | fp16 | int8 (backend permitting)"),
               output: Optional[Path] = typer.Option(None, "-o", "--output", help="destination folder"),
               inputs: List[str] = typer.Option(None, "--input", help=INPUT_HELP),
               weights: Optional[str] = typer.Option(None)):
    """Build an engine (ONNX Runtime optimized model + session options)."""
    from . import api
    from .utils import ensure_dir

    stem = Path(model).stem if model.endswith((".pt2", ".onnx")) else model.split(":")[-1]
    dest = output or Path("out") / f"{stem}-{backend}-engine"
    ensure_dir(dest.parent)
    ctx = _load(model, inputs, weights)
    v = api.engine(ctx, backend, precision)
    files = api.publish(v, dest)
    out.print(f"wrote {dest}/ ({', '.join(f.name for f in files)}; {v.size_bytes():,} bytes), "
              f"providers {v.info.get('providers')}", highlight=False)


@app.command("report")
@user_errors
def report_cmd(models: List[str] = typer.Argument(None, help=f"models ({MODEL_HELP}); default: the default zoo set"),
               all_models: bool = typer.Option(False, "--all", help="every zoo model, heavy ones too"),
               out_dir: Path = typer.Option(Path("report"), "--out", help="folder for report.json and report.md"),
               methods: Optional[str] = typer.Option(None, help="comma-separated quantize methods (default all)"),
               batches: str = typer.Option("1,32", help="comma-separated batch sizes to time"),
               threads: Optional[int] = typer.Option(None, help="intra-op threads (default: all cores)"),
               min_time: float = typer.Option(0.5, help="minimum timed seconds per variant and batch"),
               inputs: List[str] = typer.Option(None, "--input", help=INPUT_HELP),
               weights: Optional[str] = typer.Option(None),
               data: Optional[str] = typer.Option(None, help=".npz with inputs and targets for a user model"),
               metric: Optional[str] = typer.Option(None, help="accuracy | mae | mse (user model with --data)"),
               retrain: bool = typer.Option(False, help="ignore committed and cached weights")):
    """Build every variant, evaluate on held-out data, benchmark, write report.json and report.md."""
    from .errors import InputSpecError
    from .models import resolve
    from .models.zoo import DEFAULT_SET, ZOO
    from .pipeline.report import run_report
    from .utils import ensure_dir

    ensure_dir(out_dir)
    names = list(ZOO) if all_models else (models or DEFAULT_SET)
    if (inputs or weights or data) and len(names) != 1:
        raise InputSpecError("--input/--weights/--data apply to one model; name exactly one")
    specs = [resolve(n, inputs=inputs or None, weights=weights, data=data, metric=metric) for n in names]
    try:
        bs = tuple(int(b) for b in batches.split(","))
    except ValueError:
        raise InputSpecError(f"bad --batches '{batches}'; give comma-separated integers like 1,32") from None
    meths = [m.strip() for m in methods.split(",")] if methods else None
    rep = run_report(specs, out_dir=out_dir, methods=meths, batches=bs, threads=threads, min_time_s=min_time,
                     retrain=retrain)
    failed = [f"{m['model']}/{v['variant']}" for m in rep["models"] for v in m["variants"] if v["status"] != "ok"]
    out.print(f"wrote {out_dir / 'report.json'} and {out_dir / 'report.md'} in {rep['elapsed_s']:.0f} s", highlight=False)
    if failed:
        err.print(f"warning: {len(failed)} variant(s) failed: {', '.join(failed)} (see report.md)", highlight=False)


@app.command("check")
@user_errors
def check_cmd(report: Path = typer.Argument(..., help="new report.json"),
              baseline: Path = typer.Option(..., help="baseline report.json"),
              budgets: Optional[Path] = typer.Option(None, help="TOML budgets file"),
              max_drop: Optional[float] = typer.Option(None, help="max worsening in metric units (accuracy: points)"),
              max_rel_drop: Optional[float] = typer.Option(None, help="max relative worsening (0.02 = 2%)"),
              latency_tolerance: Optional[float] = typer.Option(None, help="max relative p50 latency rise (same CPU only)"),
              summary: Optional[Path] = typer.Option(None, help="also write the Markdown summary here")):
    """CI accuracy-regression gate: exits 1 naming each variant over budget."""
    from . import api
    from .pipeline.check import to_markdown
    from .utils import write_text_atomic

    res = api.check(report, baseline, budgets, max_drop, max_rel_drop, latency_tolerance)
    md = to_markdown(res)
    print(md)
    if summary:
        write_text_atomic(summary, md)
    if not res.ok:
        for f in res.failures:
            err.print(f"over budget: {f}", highlight=False)
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
