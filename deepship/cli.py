"""The ``optimize`` command: parses arguments and calls :mod:`deepship.api`. Nothing else lives here."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import EXIT_USER_ERROR, DeepshipError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="deepship: export, quantize, build engines, benchmark and report trained models.")
out = Console()
err = Console(stderr=True)

MODEL_HELP = "zoo name (mlp, cnn, lstm, gru, gpt, asr, ...), package.module:factory, a .pt2 or an .onnx file"
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
    """Run the seeded training recipes from scratch (--out writes the weights, tagged with the recipe hash)."""
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


def _stem(ref: str) -> str:
    """A file-name stem for a model reference: ``cnn``, ``model`` for ``dir/model.onnx``, the folder
    name for ``hf:PATH``, the factory name for ``package.module:factory``."""
    if ref.endswith((".pt2", ".onnx")):
        return Path(ref).stem
    if ref.startswith("hf:"):
        return Path(ref[3:].rstrip("/")).name or "hf-model"
    return ref.split(":")[-1]


@app.command("export")
@user_errors
def export_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
               output: Optional[Path] = typer.Option(None, "-o", "--output", help="destination .onnx (default out/MODEL.onnx)"),
               opset: Optional[int] = typer.Option(None, help="ONNX default-domain opset (default 18; 17 for hf: "
                                                   "models, the opset ONNX Runtime's transformer fusions match)"),
               inputs: List[str] = typer.Option(None, "--input", help=INPUT_HELP),
               weights: Optional[str] = typer.Option(None, help="safetensors or torch state_dict checkpoint")):
    """Export to ONNX (dynamo exporter) and check parity against PyTorch at a second shape."""
    from . import api
    from .utils import ensure_dir

    dest = output or Path("out") / f"{_stem(model)}.onnx"
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
    stem = _stem(model)
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
               backend: str = typer.Option("onnxruntime", help="onnxruntime | inductor (AOTInductor .pt2) | tensorrt"),
               precision: str = typer.Option("fp32", help="fp32 | fp16 | int8 | bf16 (backend permitting)"),
               shapes: Optional[str] = typer.Option(None, help="dynamic-dim ranges MIN/OPT/MAX for the batch, or "
                                                    "DIM=MIN/OPT/MAX,... (tensorrt profiles, inductor bounds)"),
               providers: Optional[str] = typer.Option(None, help="onnxruntime: execution providers in order, "
                                                       "e.g. tensorrt,cuda,cpu or auto (default cpu)"),
               strict: bool = typer.Option(False, help="onnxruntime: fail instead of falling back to another provider"),
               device: Optional[str] = typer.Option(None, help="inductor: cpu | cuda (default: cuda if present)"),
               calibration: Optional[str] = typer.Option(None, help="tensorrt int8: qdq (default) | entropy-calibrator"),
               output: Optional[Path] = typer.Option(None, "-o", "--output", help="destination folder"),
               inputs: List[str] = typer.Option(None, "--input", help=INPUT_HELP),
               weights: Optional[str] = typer.Option(None)):
    """Build an engine: ONNX Runtime (execution providers), AOTInductor package, or TensorRT engine."""
    from . import api
    from .runtimes.engines import get_backend
    from .runtimes.engines.tensorrt import parse_shapes
    from .utils import ensure_dir

    ok, why = get_backend(backend).available()
    if not ok:
        raise DeepshipError(why)
    rng = parse_shapes(shapes)
    stem = _stem(model)
    dest = output or Path("out") / (f"{stem}-{backend}-engine" + ("" if precision == "fp32" else f"-{precision}"))
    ensure_dir(dest.parent)
    ctx = _load(model, inputs, weights)
    v = api.engine(ctx, backend, precision, shapes=rng or None, providers=providers, strict=strict or None,
                   device=device, calibration=calibration)
    files = api.publish(v, dest)
    prov = v.info.get("provider") or ", ".join(v.info.get("providers") or [])
    out.print(f"wrote {dest}/ ({', '.join(f.name for f in files)}; {v.size_bytes():,} bytes): {backend} engine, "
              f"{v.precision}, from {v.parent}, runs on {prov}", highlight=False)
    rec = v.info.get("provider_record")
    if rec and rec.get("fell_back"):
        err.print(f"warning: asked for {rec['requested'][0]} but ONNX Runtime ran {rec['ran']} "
                  f"(nodes per provider: {rec['node_placement']})", highlight=False)
    if v.info.get("warning"):
        err.print(f"warning: {v.info['warning']}", highlight=False)


@app.command("report")
@user_errors
def report_cmd(models: List[str] = typer.Argument(None, help=f"models ({MODEL_HELP}); default: the default zoo set"),
               all_models: bool = typer.Option(False, "--all", help="every zoo model, heavy ones too"),
               out_dir: Path = typer.Option(Path("report"), "--out", help="folder for report.json and report.md"),
               methods: Optional[str] = typer.Option(None, help="comma-separated quantize methods (default all)"),
               batches: str = typer.Option("1,32", help="comma-separated batch sizes to time"),
               threads: Optional[int] = typer.Option(None, help="intra-op threads (default: all cores)"),
               min_time: float = typer.Option(0.25, help="minimum timed seconds per variant and batch"),
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


@app.command("serve")
@user_errors
def serve_cmd(refs: List[str] = typer.Argument(..., help="a report.json, or .onnx files / variant folders "
                                               "(NAME=PATH to name one)"),
              host: str = typer.Option("127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)"),
              port: int = typer.Option(8000, help="TCP port"),
              variant: List[str] = typer.Option(None, "--variant", help="report.json: serve only this variant "
                                                "(repeat), e.g. fp32-onnx"),
              model: List[str] = typer.Option(None, "--model", help="report.json: serve only this model (repeat)"),
              batching: bool = typer.Option(True, "--batching/--no-batching", help="dynamic batching"),
              max_batch_size: int = typer.Option(64, help="most samples per executed batch"),
              max_queue_delay_ms: float = typer.Option(0.0, help="most time the oldest request waits for a batch to "
                                                       "fill, ms"),
              max_queue_size: int = typer.Option(256, help="most queued requests per model; more get 503"),
              timeout: float = typer.Option(10.0, help="per-request timeout, s"),
              max_body_mb: float = typer.Option(16.0, help="largest request body, MiB"),
              threads: Optional[int] = typer.Option(None, help="intra-op threads per model (default: cores - 1)")):
    """Serve variants over the Open Inference Protocol (KServe v2 / Triton REST) with dynamic batching."""
    from .serving import BatcherConfig, ServerConfig, serve
    from .serving.repository import ServingError

    if max_batch_size < 1 or max_queue_size < 1 or timeout <= 0 or max_body_mb <= 0 or max_queue_delay_ms < 0:
        raise ServingError("--max-batch-size, --max-queue-size, --timeout and --max-body-mb must be positive "
                           "and --max-queue-delay-ms non-negative")
    cfg = ServerConfig(host=host, port=port, threads=threads, max_body_bytes=int(max_body_mb * 2 ** 20),
                       batching=BatcherConfig(batching, max_batch_size, max_queue_delay_ms, max_queue_size, timeout))
    serve(refs, cfg, variants=variant or None, models=model or None,
          log=lambda s: err.print(s, highlight=False, soft_wrap=True))


def _batch_sizes(text: str) -> tuple[int, ...]:
    from .errors import InputSpecError

    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise InputSpecError(f"bad --batches '{text}'; give comma-separated integers like 1,32") from None


@app.command("prune")
@user_errors
def prune_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
              sparsity: str = typer.Option("0.5", help="fraction removed: of channels/hidden units per layer "
                                           "(structured) or of weights (unstructured); comma-separated for a sweep, "
                                           "e.g. 0.25,0.5,0.75"),
              structured: bool = typer.Option(True, "--structured/--unstructured",
                                              help="remove channels with torch-pruning (smaller, faster dense model) "
                                                   "or zero single weights (shrinks only the compressed size)"),
              importance: Optional[str] = typer.Option(None, help="l2 | l1 magnitude (default l2 structured, l1 "
                                                       "unstructured)"),
              finetune_steps: int = typer.Option(300, help="fine-tune optimizer steps on the model's training data "
                                                 "after pruning (0: none)"),
              quantize: Optional[str] = typer.Option(None, help="also quantize each pruned ONNX model: int8-static | "
                                                     "int8-dynamic | fp16 | int4-weight-only"),
              batches: str = typer.Option("1,32", help="comma-separated batch sizes to time"),
              threads: Optional[int] = typer.Option(None, help="intra-op threads (default: all cores)"),
              min_time: float = typer.Option(0.5, help="minimum timed seconds per variant and batch"),
              output: Optional[Path] = typer.Option(None, "-o", "--output", help="folder for the pruned models, "
                                                    "sweep.json and sweep.md (default out/MODEL-pruned)"),
              inputs: List[str] = typer.Option(None, "--input", help=INPUT_HELP),
              weights: Optional[str] = typer.Option(None),
              data: Optional[str] = typer.Option(None, help=".npz with inputs and targets (fine-tune and metric)")):
    """Prune (structured: torch-pruning; unstructured: global L1), fine-tune, export, and tabulate the sweep."""
    from .pipeline import prune as P
    from .pipeline.stages import get_stage
    from .utils import ensure_dir, machine_info, write_json_atomic, write_text_atomic

    method = "structured" if structured else "unstructured"
    values = P.parse_sparsities(sparsity)
    bs = _batch_sizes(batches)
    if quantize:
        get_stage("quantize", quantize)
    stem = _stem(model)
    dest = ensure_dir(output or Path("out") / f"{stem}-pruned")
    ctx = _load(model, inputs, weights, data)
    ctx.progress = lambda s: err.print(s, highlight=False)
    P.prunable(ctx, method)
    rows = P.sweep(ctx, values, method, importance or ("l2" if structured else "l1"), finetune_steps, quantize, bs,
                   threads, min_time, progress=lambda s: err.print(s, highlight=False))
    built = [ctx.get(n) for r in rows[1:] for n in (r["variant"], f"{r['variant']}-onnx")
             + ((f"{r['variant']}-{quantize}",) if quantize else ())]
    P.publish_variants(built, dest)
    write_json_atomic(dest / "sweep.json", {"model": ctx.spec.name, "method": method, "machine": machine_info(),
                                            "rows": P.rows_to_json(rows)})
    md = P.sweep_markdown(rows, ctx.spec, method)
    write_text_atomic(dest / "sweep.md", f"# {ctx.spec.name}: {method} pruning sweep\n\n{md}")
    print(md)
    for r in rows[1:]:
        v = ctx.get(r["variant"])
        msg = (f"{v.name}: {v.info['parameters_before']:,} -> {v.info['parameters']:,} parameters"
               if structured else f"{v.name}: {v.info['achieved_sparsity'] * 100:.0f}% of weights zeroed, "
               f"gzip {v.info['parent_gzip_bytes']:,} -> {v.info['gzip_bytes']:,} bytes")
        ft = v.info.get("finetune", {})
        msg += f"; fine-tuned {ft['steps']} steps" if "steps" in ft else f"; not fine-tuned ({ft.get('skipped')})"
        out.print(msg, highlight=False)
    if not structured:
        out.print("note: unstructured pruning keeps dense tensors: size on disk and dense latency do not change; only "
                  "the compressed size shrinks. Use --structured for a faster model.", highlight=False)
    out.print(f"wrote {dest}/ (models, sweep.json, sweep.md)", highlight=False)


@app.command("distill")
@user_errors
def distill_cmd(teacher: str = typer.Argument(..., help=MODEL_HELP),
                student: str = typer.Option("auto", help="auto (width 0.5) | a width such as 0.25 | width=0.5,layers=1 "
                                            "| sizes in the teacher's keys (c1=8,c2=16,fc=32; hidden=64x32) | "
                                            "package.module:factory"),
                temperature: float = typer.Option(4.0, help="softmax temperature tau of the soft targets"),
                alpha: float = typer.Option(0.1, help="weight of the label loss; 1 - alpha goes to matching the teacher"),
                epochs: Optional[int] = typer.Option(None, help="student training epochs (default: the teacher's "
                                                     "recipe; classifier students distill better trained 2-3x longer)"),
                compare: bool = typer.Option(False, "--compare/--no-compare",
                                             help="also train the same student without the teacher (alpha 1)"),
                quantize: Optional[str] = typer.Option(None, help="also quantize the student's ONNX model "
                                                       "(int8-static, int8-dynamic, fp16, int4-weight-only)"),
                batches: str = typer.Option("1,32", help="comma-separated batch sizes to time"),
                threads: Optional[int] = typer.Option(None, help="intra-op threads (default: all cores)"),
                min_time: float = typer.Option(0.5, help="minimum timed seconds per variant and batch"),
                output: Optional[Path] = typer.Option(None, "-o", "--output", help="folder for the student models, "
                                                      "distill.json and distill.md (default out/MODEL-distilled)"),
                inputs: List[str] = typer.Option(None, "--input", help=INPUT_HELP),
                weights: Optional[str] = typer.Option(None),
                data: Optional[str] = typer.Option(None, help=".npz with inputs and targets (training and metric)")):
    """Distill a smaller student (Hinton et al. 2015 for classifiers, MSE for regressors), export, compare."""
    from . import api
    from .pipeline import prune as P
    from .pipeline.distill import distill_markdown
    from .pipeline.stages import get_stage
    from .utils import ensure_dir, machine_info, write_json_atomic, write_text_atomic

    bs = _batch_sizes(batches)
    if quantize:
        get_stage("quantize", quantize)
    stem = _stem(teacher)
    dest = ensure_dir(output or Path("out") / f"{stem}-distilled")
    ctx = _load(teacher, inputs, weights, data)
    ctx.progress = lambda s: err.print(s, highlight=False)
    v = api.distill(ctx, student, temperature, alpha, epochs)
    chain = api.carry_on(ctx, v, [quantize] if quantize else [])
    ctrl = api.distill(ctx, student, temperature, 1.0, epochs) if compare and alpha < 1.0 else None
    teacher_rows = [ctx.baseline(), api.export(ctx)] + ([api.quantize(ctx, quantize)] if quantize else [])
    rows = P.measure_variants(ctx, teacher_rows + [v] + chain + ([ctrl] if ctrl else []), bs, threads, min_time,
                              progress=lambda s: err.print(s, highlight=False))
    P.publish_variants([v] + chain + ([ctrl] if ctrl else []), dest)
    write_json_atomic(dest / "distill.json", {"model": ctx.spec.name, "machine": machine_info(),
                                              "student": v.info.get("student_arch"), "temperature": temperature,
                                              "alpha": alpha, "rows": P.rows_to_json(rows)})
    md = distill_markdown(rows, ctx.spec)
    write_text_atomic(dest / "distill.md", f"# {ctx.spec.name}: distillation\n\n{md}")
    print(md)
    out.print(f"student {v.info.get('student_arch')}: {v.info['parameters']:,} parameters "
              f"({v.info['param_ratio']:.2f}x the teacher's {v.info['teacher_parameters']:,})", highlight=False)
    out.print(f"wrote {dest}/ (models, distill.json, distill.md)", highlight=False)


@app.command("generate")
@user_errors
def generate_cmd(model: str = typer.Argument("gpt", help="decoder zoo name (gpt)"),
                 prompt: str = typer.Option(..., "--prompt", help="prompt text"),
                 max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="token limit"),
                 variant: str = typer.Option("fp32-onnx", help="fp32-torch | fp32-onnx | int8-dynamic | int4-b32 | "
                                             "int4-b128 (aliases torch, fp32, int8, int4)"),
                 speculative: bool = typer.Option(False, "--speculative", help="speculative decoding with --draft"),
                 draft: str = typer.Option("gpt-draft", help="draft model for --speculative"),
                 k: int = typer.Option(4, "--k", help="draft tokens proposed per round"),
                 draft_variant: Optional[str] = typer.Option(None, "--draft-variant",
                                                             help="the draft's variant (default int8-dynamic)"),
                 sample: bool = typer.Option(False, "--sample", help="sample instead of greedy decoding"),
                 temperature: float = typer.Option(1.0, help="sampling temperature (with --sample)"),
                 top_k: Optional[int] = typer.Option(None, "--top-k", help="top-k filter (with --sample)"),
                 top_p: Optional[float] = typer.Option(None, "--top-p", help="nucleus top-p filter (with --sample)"),
                 seed: int = typer.Option(0, help="sampling seed"),
                 stop: List[str] = typer.Option(None, "--stop", help="one-token stop string, e.g. $'\\n'; repeatable"),
                 threads: int = typer.Option(1, help="intra-op threads (1 is fastest for batch-1 decoding of this model)"),
                 as_json: bool = typer.Option(False, "--json", help="print the result as JSON")):
    """Generate text with the GPT decoder (KV cache; optionally speculative decoding with a draft)."""
    from . import api

    res = api.generate(model, prompt, max_new_tokens=max_new_tokens, variant=variant, speculative=speculative,
                       draft=draft, k=k, draft_variant=draft_variant, greedy=not sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, stop=stop or (), threads=threads)
    if as_json:
        print(json.dumps(res))
        return
    out.print(prompt + res["text"], highlight=False, markup=False)
    acc = f", acceptance {res['acceptance_rate']:.2f} at k={res['k']}" if res["acceptance_rate"] is not None else ""
    err.print(f"{res['new_tokens']} tokens ({res['finish_reason']}) from {model}/{res['variant']}"
              + (f" + draft {res['draft']}" if res["draft"] else "")
              + f": prefill {res['prefill_ms']:.1f} ms, {res['tokens_per_s']:.1f} tokens/s{acc}", highlight=False)


asr_app = typer.Typer(no_args_is_help=True, help="Streaming speech recognition: deployment bundle and transcription.")
app.add_typer(asr_app, name="asr")


@asr_app.command("bundle")
@user_errors
def asr_bundle_cmd(out_dir: Path = typer.Option(Path("asr-bundle"), "--out", help="bundle folder (replaced atomically)"),
                   variant: str = typer.Option("int8-dynamic", help="fp32-onnx | int8-dynamic | int8-static"),
                   measure: bool = typer.Option(True, help="measure CER, RTF and chunk latency into the README")):
    """Write the edge deployment bundle: INT8 model, token table, feature config, a minimal runner."""
    from . import api

    res = api.asr_bundle(out_dir, variant=variant, measure=measure)
    out.print(f"wrote {res['dir']}/ ({', '.join(res['files'])}): model {res['size_bytes'] / 1024:.0f} KB, "
              f"bundle {res['bundle_bytes'] / 1024:.0f} KB", highlight=False)
    if "cer" in res:
        out.print(f"held-out voices: CER {res['cer'] * 100:.2f}%, WER {res['wer'] * 100:.2f}%; RTF {res['rtf_1thread']:.4f} "
                  f"on 1 thread; per-chunk p50 {res['chunk_ms_p50']:.3f} ms, p99 {res['chunk_ms_p99']:.3f} ms; "
                  f"algorithmic latency {res['algorithmic_latency_ms']:.0f} ms", highlight=False)


@asr_app.command("transcribe")
@user_errors
def asr_transcribe_cmd(audio: Path = typer.Argument(..., help="audio file: WAV/FLAC/OGG, any rate, mono or stereo"),
                       stream: bool = typer.Option(False, "--stream", help="feed 100 ms pieces and print partial results"),
                       variant: str = typer.Option("int8-dynamic", help="fp32-torch | fp32-onnx | int8-dynamic | int8-static"),
                       beam: int = typer.Option(0, help="CTC prefix beam search width for the final result (0: greedy)"),
                       threads: int = typer.Option(1, help="intra-op threads"),
                       as_json: bool = typer.Option(False, "--json", help="print the result as JSON")):
    """Transcribe an audio file with the streaming recognizer."""
    from . import api

    res = api.transcribe(audio, variant=variant, stream=stream, beam=beam, threads=threads,
                         on_partial=(lambda t: err.print(f"... {t}", highlight=False, markup=False)) if stream else None)
    if as_json:
        print(json.dumps(res))
        return
    out.print(res["text"], highlight=False, markup=False)
    rtf = f", RTF {res['rtf']:.4f}" if res["rtf"] is not None else ""
    err.print(f"{res['seconds']:.2f} s of audio, {res['chunks']} chunks, {res['variant']}{rtf}", highlight=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
