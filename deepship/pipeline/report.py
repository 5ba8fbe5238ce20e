"""``optimize report``: build the variant tree, evaluate and benchmark every variant, write the report.

Outputs ``report.json`` (schema :data:`SCHEMA_VERSION`; machine, library versions and date),
``report.md`` (one table per model) and ``report.html`` (plots; :mod:`.report_html`), all written
atomically. Progress shows with rich.
Variants on the Pareto front of batch-32 latency against the metric are marked (the Olive idea).
"""
from __future__ import annotations

import contextlib
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DeepshipError, StageError
from ..models.spec import ModelSpec
from ..runtimes.benchmark import measure as measure_latency
from ..runtimes.engines import get_backend
from . import distill as D
from . import prune as P
from ..utils import (check_writable, default_threads, first_line, machine_info, sweep_stale_temp, write_json_atomic,
                     write_text_atomic)
from .context import ModelContext
from .evaluate import bench_feeds, evaluate
from .formatting import fmt_bytes, fmt_change, fmt_metric, lat_cell, notes
from .report_html import write_html
from .stages import get_stage

SCHEMA_VERSION = 1

#: (variant name, stage, method, params, parent). Entries whose parent is missing are skipped.
DEFAULT_PLAN: list[tuple[str, str, str, dict, str]] = [
    ("bf16-torch", "quantize", "bf16", {}, "fp32-torch"),
    ("fp32-onnx", "export", "onnx", {}, "fp32-torch"),
    ("int8-dynamic", "quantize", "int8-dynamic", {}, "fp32-onnx"),
    ("int8-static", "quantize", "int8-static", {"calibration": "minmax", "per_channel": True}, "fp32-onnx"),
    ("fp16", "quantize", "fp16", {}, "fp32-onnx"),
    ("int4-weight-only", "quantize", "int4-weight-only", {"block_size": 32}, "fp32-onnx"),
    ("ort-engine", "engine", "onnxruntime", {"precision": "fp32"}, "fp32-onnx"),
]

QUANT_METHODS = ("int8-dynamic", "int8-static", "fp16", "bf16", "int4-weight-only")


def plan_for(methods: Sequence[str] | None = None, engine: bool = True) -> list[tuple[str, str, str, dict, str]]:
    """The default plan, restricted to ``methods`` (quantize methods) and with or without the engine."""
    out = []
    for entry in DEFAULT_PLAN:
        name, stage, method, params, parent = entry
        if stage == "quantize" and methods is not None and method not in methods:
            continue
        if stage == "engine" and not engine:
            continue
        out.append(entry)
    return out


def extra_entries(ctx: ModelContext, engines: Sequence[str] = (), prune: Sequence[float] = (), distill: bool = False,
                  finetune_steps: int = P.REPORT_FINETUNE_STEPS) -> list[tuple[str, str, str, dict, str]]:
    """Plan entries asked for on the command line, for any model: an engine row per backend in
    ``engines`` (``NAME`` or ``NAME:PRECISION``: row ``NAME-engine[-PRECISION]``, from the FP32 ONNX
    model or, for torch backends, the torch model; e.g. ``openvino:int8``),
    structured pruning at each sparsity in ``prune`` (fine-tuned ``finetune_steps`` steps on the
    training data when there is one) carried on to ONNX, and with ``distill`` a width-0.5 student
    carried on to ONNX. Refused up front when the model cannot take them.

    Raises:
        StageError: an unknown or unavailable backend, an ONNX-only model with prune/distill, an
            architecture that cannot be pruned, or distillation without labeled training data.
    """
    out: list[tuple[str, str, str, dict, str]] = []
    for entry in engines:
        name, _, precision = entry.partition(":")
        precision = precision or "fp32"
        b = get_backend(name)
        ok, why = b.available()
        if not ok:
            raise StageError(f"--engines {name}: {why}")
        if precision not in b.precisions:
            raise StageError(f"--engines {entry}: the {name} engine builds {', '.join(b.precisions)}")
        out.append((f"{name}-engine" + ("" if precision == "fp32" else f"-{precision}"), "engine", name,
                    {"precision": precision}, "fp32-torch" if b.consumes == "torch" else "fp32-onnx"))
    for s in prune:
        P.prunable(ctx, "structured")
        n = P.variant_name("structured", s)
        out.append((n, "prune", "structured", {"sparsity": float(s), "importance": "l2",
                                               "finetune_steps": int(finetune_steps)}, "fp32-torch"))
        out += P.chain_entries(n, (), P.export_method(ctx))
    if distill:
        if not ctx.has_torch:
            raise StageError(f"cannot distill '{ctx.spec.name}': it is an ONNX file; distillation needs the torch teacher")
        D.check_distillable(ctx)
        out += D.distill_entries(width=0.5)
    return out


def model_todo(ctx: ModelContext, plan, extra: Sequence[tuple] = ()) -> list[tuple]:
    """The entries a model's report builds, in order: the baseline (``(name, None, None, None, None)``),
    the family's plan, then ``extra`` entries not already in it."""
    plan = ctx.arch.plan_for(ctx.spec, plan)
    plan += [e for e in extra if e[0] not in {p[0] for p in plan}]
    return [("fp32-torch" if ctx.has_torch else "fp32-onnx", None, None, None, None)] + list(plan)


def model_rows(ctx: ModelContext, todo: Sequence[tuple], batches: Sequence[int], threads: int | None,
               min_time_s: float, advance: Callable[[str], None], measure: set[str] | None = None) -> list[dict]:
    """Build, evaluate and benchmark the entries of ``todo`` (see :func:`model_todo`) in order; one
    row each. With ``measure``, only the entries named there get a row (their ancestors in ``todo``
    are built, or taken from the cache, and not measured): how a Ray task runs one variant chain. The
    baseline is always evaluated (its outputs are the drift reference, its metric the change's base)."""
    rows: list[dict[str, Any]] = []
    reference = None
    base_metric = None
    for entry in todo:
        name = entry[0]
        wanted = measure is None or name in measure
        row: dict[str, Any] = {"variant": name}
        t0 = time.perf_counter()
        try:
            if entry[1] is None:
                v = ctx.baseline()
            else:
                _, stage, method, params, parent = entry
                if parent not in ctx._variants:
                    if wanted:
                        advance(name)
                    continue  # parent not in this model's tree (e.g. ONNX-only model has no torch)
                v = ctx.build(name, stage, method, params, parent)
            if not wanted and entry[1] is not None:
                continue
            sess = ctx.session(v, threads=threads)
            ev = evaluate(ctx, sess, reference)
            if reference is None:
                reference = ev["outputs"]
                base_metric = ev["metric"]
            if not wanted:
                continue
            lat = {}
            for b in batches:
                try:
                    lat[str(b)] = measure_latency(sess, bench_feeds(ctx, b), min_time_s=min_time_s, batch=b).to_dict()
                except DeepshipError as e:
                    lat[str(b)] = {"error": str(e)}
            row.update({
                "parent": v.parent, "stage": v.stage, "method": v.method, "params": v.params, "format": v.format,
                "runtime": v.runtime, "provider": getattr(sess, "provider", ""), "precision": v.precision,
                "size_bytes": v.size_bytes(), "parameters": v.info.get("parameters"), "latency_ms": lat,
                "metric": ev["metric"], "drift": ev["drift"], "info": _public_info(v.info), "status": "ok",
                "artifact": str(v.path) if v.path else None, "key": v.key,
            })
            extra = ctx.arch.measure(ctx, v, sess) if ctx.arch.measure is not None else None
            if extra is None and any(a.stage in ("prune", "distill") for a in ctx.lineage(v)):
                extra = P.report_notes(ctx, v, sess)  # any model's prune/distill rows say what was done
            if extra is not None:
                row["extra"] = extra
            if ev["metric"] is not None and base_metric is not None:
                row["metric_change"] = ev["metric"] - base_metric
                row["metric_change_rel"] = (ev["metric"] - base_metric) / abs(base_metric) if base_metric else None
        except DeepshipError as e:
            if not wanted:
                continue  # an ancestor another task measures: its row says why; descendants are skipped
            row.update({"status": "failed", "error": str(e)})
        except Exception as e:  # a stage crashing inside a library: record it, keep going
            if not wanted:
                continue
            last = traceback.extract_tb(e.__traceback__)[-1]
            row.update({"status": "failed",
                        "error": f"{type(e).__name__}: {first_line(e, 200)} "
                                 f"({Path(last.filename).name}:{last.lineno})"})
        row["build_eval_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        advance(name)
    return rows


def model_section(ctx: ModelContext, rows: list[dict], batches: Sequence[int]) -> dict[str, Any]:
    """One model's report section from its rows (in plan order): Pareto marks, speedups, the header."""
    spec = ctx.spec
    _mark_pareto(rows, spec, batches)
    _add_speedups(rows)
    ds = ctx.dataset()
    return {
        "model": spec.name, "description": spec.description, "source": spec.source, "task": spec.task,
        "data": ds.source if ds is not None else "none: output drift against FP32 on random inputs",
        "metric": None if spec.metric is None else {"name": spec.metric.name, "higher_is_better": spec.metric.higher_is_better,
                                                     "unit": spec.metric.unit, "scale": spec.metric.scale},
        "inputs": [t.describe() for t in spec.inputs],
        "weights": ctx.weights_info,
        "baselines": (spec.baselines(ds) if spec.baselines and ds is not None else []),
        "variants": rows,
    }


def _add_speedups(rows: list[dict]) -> None:
    """``row["speedup"]``: ``{batch: fp32-torch p50 / this row's p50}`` (> 1 is faster), when both were timed."""
    base = next((r for r in rows if r.get("stage") == "baseline" and r.get("status") == "ok"), None)
    if base is None:
        return
    for r in rows:
        if r.get("status") != "ok":
            continue
        sp = {b: round(base["latency_ms"][b]["p50_ms"] / t["p50_ms"], 3)
              for b, t in r.get("latency_ms", {}).items()
              if "p50_ms" in t and "p50_ms" in base["latency_ms"].get(b, {}) and t["p50_ms"] > 0}
        r["speedup"] = sp


def _public_info(info: dict) -> dict:
    return {k: v for k, v in info.items() if k not in ("session_options",)}


def _mark_pareto(rows: list[dict], spec: ModelSpec, batches: Sequence[int]) -> None:
    if spec.metric is None or not batches:
        return
    b = str(max(batches))
    ok = [r for r in rows if r.get("status") == "ok" and r.get("metric") is not None and "p50_ms" in r["latency_ms"].get(b, {})]
    sign = 1 if spec.metric.higher_is_better else -1
    for r in ok:
        lat, m = r["latency_ms"][b]["p50_ms"], sign * r["metric"]
        r["pareto"] = not any(o is not r and o["latency_ms"][b]["p50_ms"] <= lat and sign * o["metric"] >= m and
                              (o["latency_ms"][b]["p50_ms"] < lat or sign * o["metric"] > m) for o in ok)


def run_report(specs: Sequence[ModelSpec], out_dir: str | Path = "report", methods: Sequence[str] | None = None,
               batches: Sequence[int] = (1, 32), threads: int | None = None, min_time_s: float = 0.25,
               engine: bool = True, retrain: bool = False, show_progress: bool = True,
               plan: list | None = None, engines: Sequence[str] | None = None, prune: Sequence[float] = (),
               distill: bool = False, ray: bool = False, ray_address: str | None = None,
               compare: dict | None = None) -> dict[str, Any]:
    """Build the variant tree of each model, evaluate and benchmark every variant, write the report.

    Args:
        specs: resolved model specs.
        out_dir: folder for ``report.json`` and ``report.md``.
        methods: quantize methods to include (default all of :data:`QUANT_METHODS`).
        batches: batch sizes to time (samples per call).
        threads: intra-op threads for every runtime (default: all cores).
        min_time_s: minimum timed seconds per (variant, batch).
        engines: engine backends to add rows for (``onnxruntime``, ``inductor``, ``tensorrt``); given,
            they replace the default ONNX Runtime engine row.
        prune: structured sparsities to add (pruned, fine-tuned on the training data, exported).
        distill: add a width-0.5 student distilled from the model (needs labeled training data).
        ray: run the builds and measurements as Ray tasks (:mod:`deepship.pipeline.distributed`): a
            local cluster, or ``ray_address`` / ``$RAY_ADDRESS``.
        compare: a baseline report (:func:`deepship.pipeline.check.load_report`) shown side by side
            in ``report.html``, regressions first.

    Returns:
        The report dict (also written to ``out_dir/report.json``, ``report.md`` and ``report.html``).

    Raises:
        OutputPathError: ``out_dir`` cannot be written (checked before any work).
        StageError: an unknown method.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = check_writable(out_dir)  # created when the report is written: a failed run leaves no folder
    sweep_stale_temp(out)  # a report write killed half-way
    for m in methods or ():
        if m not in QUANT_METHODS:
            raise StageError(f"unknown quantize method '{m}'; use one of {', '.join(QUANT_METHODS)}")
    if not batches or any(int(b) != b or b < 1 for b in batches):
        raise StageError(f"batch sizes {list(batches)} must be positive integers, like 1,32")
    the_plan = plan if plan is not None else plan_for(methods, engine and engines is None)
    for _, stage, method, _, _ in the_plan:
        get_stage(stage, method)
    for s_ in prune:
        P.variant_name("structured", s_)
        if not 0.0 < float(s_) < 1.0:
            raise StageError(f"sparsity {s_} is outside (0, 1); give fractions such as 0.25,0.5")
    threads = threads or default_threads()
    if (ray or ray_address) and retrain:
        raise StageError("--retrain with --ray: retrain first (optimize train MODEL), then run the report on Ray; "
                         "every task must load the same weights")
    # every model's extra rows are checked before any work starts
    contexts = [ModelContext(spec, retrain=retrain) for spec in specs]
    extras = [extra_entries(ctx, engines or (), prune, distill) for ctx in contexts]
    t0 = time.perf_counter()
    console = Console(stderr=True)
    models: list[dict] = []
    distributed = None
    with contextlib.ExitStack() as stack:
        if ray or ray_address:
            from .distributed import ray_cluster, run_on_ray

            cluster = stack.enter_context(ray_cluster(ray_address))  # unreachable: fails before any work
        prog = stack.enter_context(Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                            TimeElapsedColumn(), console=console, disable=not show_progress,
                                            transient=False))
        todos = [model_todo(ctx, the_plan, extra) for ctx, extra in zip(contexts, extras)]
        bars = [prog.add_task(f"{ctx.spec.name}", total=len(todo)) for ctx, todo in zip(contexts, todos)]
        if ray or ray_address:
            results = run_on_ray(contexts, todos, batches, threads, min_time_s,
                                 lambda i, name: prog.update(bars[i], advance=1,
                                                             description=f"{contexts[i].spec.name}: {name}"))
            for ctx, res in zip(contexts, results):
                ctx.weights_info = res["weights"]
                models.append(model_section(ctx, res["rows"], batches))
            distributed = {"engine": "ray", **cluster,
                           "tasks": {ctx.spec.name: res["tasks"] for ctx, res in zip(contexts, results)}}
        else:
            for ctx, todo, task in zip(contexts, todos, bars):
                name = ctx.spec.name
                ctx.progress = lambda s, t=task: prog.update(t, description=s[:60])
                rows = model_rows(ctx, todo, batches, threads, min_time_s,
                                  lambda v, t=task, n=name: prog.update(t, advance=1, description=f"{n}: {v}"))
                models.append(model_section(ctx, rows, batches))
                prog.update(task, description=f"{name}: done")
    report = {
        "schema_version": SCHEMA_VERSION,
        "tool": "deepship",
        "machine": machine_info(),
        "settings": {"batches": list(batches), "threads": threads, "min_time_s": min_time_s,
                     "methods": list(methods) if methods else list(QUANT_METHODS)},
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "models": models,
    }
    if distributed:
        report["distributed"] = distributed
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", to_markdown(report))
    write_html(report, out / "report.html", baseline=compare)
    return report


def summary(report: dict, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The machine-readable summary ``optimize report --json`` prints: the files written, the
    machine, and per model and variant its status, metric, change, size (bytes), p50 latency (ms)
    and speedup at each batch, and whether it is on the Pareto front."""
    files = {k: str(Path(out_dir) / f"report.{k}") for k in ("json", "md", "html")} if out_dir is not None else {}
    return {
        "files": files, "elapsed_s": report.get("elapsed_s"), "machine": report.get("machine", {}),
        "settings": report.get("settings", {}),
        "failed": [f"{m['model']}/{v['variant']}" for m in report["models"] for v in m["variants"] if v["status"] != "ok"],
        "models": [{"model": m["model"], "metric": (m.get("metric") or {}).get("name"), "variants": [
            {"variant": v["variant"], "status": v["status"], "metric": v.get("metric"),
             "metric_change": v.get("metric_change"), "size_bytes": v.get("size_bytes"),
             "p50_ms": {b: t.get("p50_ms") for b, t in v.get("latency_ms", {}).items()},
             "speedup": v.get("speedup", {}), "pareto": bool(v.get("pareto")),
             **({"error": v["error"]} if "error" in v else {})} for v in m["variants"]]} for m in report["models"]],
    }


def to_markdown(report: dict) -> str:
    """Render the report as Markdown: machine header, then one table per model."""
    m = report["machine"]
    bs = [str(b) for b in report["settings"]["batches"]]
    lines = ["# deepship report", "",
             f"Machine: {m['cpu']} ({m['logical_cores']} logical cores; {m.get('cpu_features', '')}), "
             f"{report['settings']['threads']} threads. Date: {m['date']}. "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", ""]
    for mod in report["models"]:
        met = mod["metric"]
        mname = met["name"] + (" (higher is better)" if met["higher_is_better"] else " (lower is better)") if met else "output drift vs FP32"
        lines += [f"## {mod['model']}", "", f"{mod['description']}. Data: {mod['data']}. Metric: {mname}.", ""]
        for b in mod.get("baselines", []):
            lines += [f"Classical reference: {b['name']} {b['metric']} = {b['value']:.2f} ({b['source']}).", ""]
        hdr = ["variant", "parent", "format", "precision", "size"] + [f"p50 ms b{b}" for b in bs] + \
              [f"p99 ms b{bs[-1]}", f"throughput/s b{bs[-1]}"] + [f"speedup b{b}" for b in bs] + \
              [met["name"] if met else "metric", "change", "notes"]
        lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for r in mod["variants"]:
            thr = r.get("latency_ms", {}).get(bs[-1], {}).get("throughput")
            cells = [r["variant"], r.get("parent") or "-", r.get("format", "-"), r.get("precision", "-"),
                     fmt_bytes(r.get("size_bytes"))] + [lat_cell(r, b) for b in bs] + \
                    [lat_cell(r, bs[-1], "p99_ms"), f"{thr:,.0f}" if thr else "-"] + \
                    [f"{r['speedup'][b]:.2f}x" if b in r.get("speedup", {}) else "-" for b in bs] + \
                    [fmt_metric(r.get("metric"), met), fmt_change(r, met), notes(r)]
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
        lines.append("")
    lines.append(f"Built in {report.get('elapsed_s', 0):.0f} s. Sizes include ONNX external data. "
                 "Latency: wall clock per call, median of repeated runs after warm-up. Speedup: FP32 PyTorch p50 "
                 "over the row's p50 at that batch size (measured in the same run).")
    return "\n".join(lines) + "\n"
