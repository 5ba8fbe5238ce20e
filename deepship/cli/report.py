"""Commands that measure and gate: ``report``, ``check``, ``cache``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ._common import (BATCHES, CALIBRATION_DATA, DATA, INPUTS, METRIC, MODEL_HELP, NAME, THREADS, TRAIN_DATA, WEIGHTS,
                      app, batch_sizes, csv, err, load, note, out, user_errors)


@app.command("report")
@user_errors
def report_cmd(models: List[str] = typer.Argument(None, help=f"models ({MODEL_HELP}); default: the default zoo set"),
               all_models: bool = typer.Option(False, "--all", help="every zoo model, heavy ones too"),
               out_dir: Path = typer.Option(Path("report"), "--out", help="folder for report.json and report.md"),
               methods: Optional[str] = typer.Option(None, help="comma-separated quantize methods (default all)"),
               engines: Optional[str] = typer.Option(None, help="engine rows to add: onnxruntime,inductor,tensorrt,"
                                                     "openvino, NAME:PRECISION for another precision (openvino:int8) "
                                                     "(default: onnxruntime)"),
               prune: Optional[str] = typer.Option(None, help="structured pruning rows at these sparsities, e.g. "
                                                   "0.25,0.5 (fine-tuned on --train-data for your own model)"),
               distill: bool = typer.Option(False, "--distill", help="add a width-0.5 student distilled from the model "
                                            "(needs --train-data for your own model)"),
               batches: str = BATCHES,
               threads: Optional[int] = THREADS,
               min_time: float = typer.Option(0.25, help="minimum timed seconds per variant and batch"),
               inputs: List[str] = INPUTS, weights: Optional[str] = WEIGHTS, name: Optional[str] = NAME,
               data: Optional[str] = DATA, train_data: Optional[str] = TRAIN_DATA,
               calibration_data: Optional[str] = CALIBRATION_DATA, metric: Optional[str] = METRIC,
               retrain: bool = typer.Option(False, help="ignore committed and cached weights"),
               compare: Optional[Path] = typer.Option(None, "--compare", help="an earlier report.json to show side "
                                                      "by side in report.html, regressions first"),
               as_json: bool = typer.Option(False, "--json", help="print the machine summary as JSON on stdout "
                                            "(messages go to stderr)"),
               ray: bool = typer.Option(False, "--ray", help="run the builds and measurements as Ray tasks: on "
                                        "$RAY_ADDRESS when set, else on a local cluster (pip install 'deepship[ray]')"),
               ray_address: Optional[str] = typer.Option(None, "--ray-address", help="the Ray cluster to use, "
                                                         "HOST:PORT, ray://HOST:PORT or auto (implies --ray)")):
    """Build every variant, evaluate on held-out data, benchmark, write report.json, report.md and report.html."""
    from ..errors import InputSpecError
    from ..models.zoo import DEFAULT_SET, ZOO
    from ..pipeline import prune as P
    from ..pipeline.check import load_report
    from ..pipeline.report import run_report, summary

    names = list(ZOO) if all_models else (models or DEFAULT_SET)
    per_model = inputs or weights or data or train_data or calibration_data or name
    if per_model and len(names) != 1:
        raise InputSpecError("--input/--weights/--data/--train-data/--calibration-data/--name apply to one model; "
                             "name exactly one")
    bs = batch_sizes(batches)
    sparsities = P.parse_sparsities(prune) if prune else []
    old = load_report(compare) if compare is not None else None  # a bad --compare fails before any work
    specs = [load(n, inputs, weights, data, metric, retrain, train_data, calibration_data, name).spec for n in names]
    rep = run_report(specs, out_dir=out_dir, methods=csv(methods) or None, batches=bs, threads=threads,
                     min_time_s=min_time, retrain=retrain, engines=csv(engines) or None, prune=sparsities,
                     distill=distill, ray=ray, ray_address=ray_address, compare=old)
    failed = [f"{m['model']}/{v['variant']}" for m in rep["models"] for v in m["variants"] if v["status"] != "ok"]
    if as_json:
        print(json.dumps(summary(rep, out_dir), default=str))
    (err if as_json else out).print(f"wrote {out_dir / 'report.json'}, report.md and report.html in "
                                    f"{rep['elapsed_s']:.0f} s", highlight=False, markup=False)
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
              latency_floor_ms: Optional[float] = typer.Option(None, help="p50 rises below this many ms are timing "
                                                                "noise, never a regression"),
              summary: Optional[Path] = typer.Option(None, help="also write the Markdown summary here"),
              html: Optional[Path] = typer.Option(None, "--html", help="also write an HTML page: the two runs side "
                                                  "by side, regressions first, with the new run's plots")):
    """CI accuracy-regression gate: exits 1 naming each variant over budget."""
    from .. import api
    from ..pipeline.check import load_report, to_markdown
    from ..pipeline.report_html import write_html
    from ..utils import check_writable, write_text_atomic

    for p in (summary, html):
        if p is not None:
            check_writable(p)
    res = api.check(report, baseline, budgets, max_drop, max_rel_drop, latency_tolerance, latency_floor_ms)
    md = to_markdown(res)
    print(md)
    if summary:
        write_text_atomic(summary, md)
    if html:
        write_html(load_report(report), html, baseline=load_report(baseline),
                   title=f"deepship check: {report} against {baseline}", gate=res)
    if not res.ok:
        for f in res.failures:
            err.print(f"over budget: {f}", highlight=False)
        raise typer.Exit(1)




def _duration_s(text: str) -> float:
    """``"20m"``, ``"90s"``, ``"1h"`` or plain seconds -> seconds."""
    from ..errors import StageError

    t = text.strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        v = float(t[:-1]) * mult if mult else float(t)
    except ValueError:
        raise StageError(f"--time-budget {text} is not a duration; write 20m, 90s or 1h") from None
    if v <= 0:
        raise StageError(f"--time-budget {text} must be positive")
    return v


@app.command("tune")
@user_errors
def tune_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
             max_drop: Optional[float] = typer.Option(None, help="max worsening of the metric in its units "
                                                      "(accuracy: points; the CI gate's max_drop)"),
             max_rel_drop: Optional[float] = typer.Option(None, help="max relative worsening (0.01 = 1%)"),
             require: List[str] = typer.Option(None, "--require", help="a bar on an extra measure, NAME>=VALUE or "
                                               "NAME<=VALUE, e.g. recall@1>=0.95 (repeatable)"),
             objective: str = typer.Option("latency", help="latency (p50 at --batch) | size (bytes)"),
             batch: int = typer.Option(32, help="batch size the latency is measured at"),
             backends: str = typer.Option("torch,onnxruntime,openvino", help="candidates' backends: torch, "
                                          "onnxruntime, openvino, inductor"),
             time_budget: str = typer.Option("20m", help="no new trial starts after this long (20m, 90s, 1h)"),
             max_layers: int = typer.Option(48, help="at most this many layers get a sensitivity trial"),
             precisions: Optional[str] = typer.Option(None, help="only candidates of these precisions, e.g. "
                                                      "fp32,int8 (a fleet without BF16 hardware)"),
             out_dir: Path = typer.Option(Path("tune"), "--out", help="folder for tune.json/.md/.html, "
                                          "recipe.toml and the chosen model (OUT/model)"),
             threads: Optional[int] = THREADS,
             inputs: List[str] = INPUTS, weights: Optional[str] = WEIGHTS, name: Optional[str] = NAME,
             data: Optional[str] = DATA, calibration_data: Optional[str] = CALIBRATION_DATA,
             metric: Optional[str] = METRIC):
    """Find the fastest (or smallest) variant within an accuracy budget, across backends and per layer;
    print the Pareto front, publish the chosen variant and write recipe.toml (rebuild: optimize build)."""
    from .. import api
    from ..pipeline.tune import Budget
    from ..utils import check_writable

    budget = Budget(max_drop, max_rel_drop, Budget.parse_require(require or [])).check()
    check_writable(out_dir / "tune.json")
    tb = _duration_s(time_budget)
    ctx = load(model, inputs, weights, data, metric, calibration_data=calibration_data, name=name)
    args = {"ref": model, "inputs": list(inputs or []) or None, "weights": weights, "data": data,
            "calibration_data": calibration_data, "metric": metric, "name": name}
    res = api.tune(ctx, budget, out_dir, args, objective=objective, batch=batch, backends=csv(backends),
                   time_budget_s=tb, threads=threads, max_layers=max_layers, precisions=csv(precisions) or None,
                   progress=note)
    unit = "ms" if objective == "latency" else "bytes"
    out.print(f"Pareto front ({objective} in {unit} at batch {batch} against the drop in {res['metric']}):",
              highlight=False)
    for t in res["trials"]:
        if t["pareto"] or t["name"] == res["chosen"]:
            val = t["latency_ms"] if objective == "latency" else t["size_bytes"]
            extra = ", ".join(f"{k} {v}" for k, v in t["extra"].items())
            out.print(f"  {t['name']:<40} {t['backend']:<12} {val:>10.4g} {unit}  drop {t['drop']:.4g}"
                      + (f"  ({extra})" if extra else "") + ("  <- chosen" if t["name"] == res["chosen"] else "")
                      + ("" if t["meets"] else f"  [misses: {t['why']}]"), highlight=False, markup=False)
    if res["chosen"]:
        out.print(f"chose {res['chosen']}; wrote {res['files']['model']}/, {res['files']['recipe']}, tune.md and "
                  f"tune.html in {out_dir}/ ({res['elapsed_s']:.0f} s)", highlight=False, markup=False)
    else:
        err.print(f"error: no variant of {ctx.spec.name} met the budget ({len(res['trials'])} tried, see "
                  f"{out_dir / 'tune.md'}); loosen the budget or add --backends", highlight=False, markup=False)
        raise typer.Exit(2)


@app.command("build")
@user_errors
def build_cmd(recipe: Path = typer.Argument(..., help="recipe.toml written by optimize tune"),
              output: Optional[Path] = typer.Option(None, "-o", "--output", help="destination folder (default "
                                                    "out/<model>-<variant>)"),
              strict: bool = typer.Option(True, help="fail when a step's cache key differs from the recipe's"),
              verify: bool = typer.Option(True, help="evaluate the rebuilt variant and hold it to the recipe's budget")):
    """Rebuild the variant a tune recipe describes, step by step, and check it is the same one."""
    from .. import api
    from ..pipeline.evaluate import evaluate
    from ..utils import check_writable

    ctx, v, r, warnings = api.build_recipe(recipe, strict=strict)
    for w in warnings:
        err.print(f"warning: {w}", highlight=False, markup=False)
    dest = check_writable(output or Path("out") / f"{ctx.spec.name}-{v.name}")
    files = api.publish(v, dest)
    out.print(f"wrote {dest}/ ({', '.join(f.name for f in files)}; {v.size_bytes():,} bytes): {v.name} of "
              f"{ctx.spec.name}, {len(r.get('step', []))} steps, keys as in the recipe"
              + ("" if not warnings else " except the ones warned about"), highlight=False, markup=False)
    target = r.get("target", {})
    if verify and target.get("metric") is not None:
        got = evaluate(ctx, ctx.session(v), None)["metric"]
        out.print(f"{ctx.spec.metric.name if ctx.spec.metric else 'metric'}: {got:.6g} (recipe: {target['metric']:.6g})",
                  highlight=False)
        if got is not None and abs(got - target["metric"]) > 1e-4 * max(1.0, abs(target["metric"])):
            err.print(f"error: the rebuilt {v.name} scores {got:.6g}, the recipe recorded {target['metric']:.6g}",
                      highlight=False, markup=False)
            raise typer.Exit(1)


cache_app = typer.Typer(no_args_is_help=True, help="The artifact cache ($DEEPSHIP_CACHE, default ./.deepship-cache).")
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
@user_errors
def cache_ls_cmd(as_json: bool = typer.Option(False, "--json", help="print the entries as JSON")):
    """List the built variants in the cache (model, variant, key, size, age, valid)."""
    import time

    from ..pipeline.formatting import fmt_bytes
    from ..pipeline.variants import cache_entries
    from ..utils import cache_root, sweep_stale_temp

    swept = sweep_stale_temp(cache_root())
    rows = cache_entries()
    if as_json:
        print(json.dumps({"root": str(cache_root()), "entries": rows, "stale_temp_removed": [str(p) for p in swept]}))
        return
    out.print(f"cache: {cache_root()} ({len(rows)} variants, {fmt_bytes(sum(r['bytes'] for r in rows))})",
              highlight=False, markup=False)
    for r in rows:
        age = (time.time() - r["modified"]) / 3600
        out.print(f"{r['model']:<16} {r['variant']:<36} {r['key']}  {fmt_bytes(r['bytes']):>9}  {age:6.1f} h"
                  + ("" if r["valid"] else "  (invalid: rebuilt on next use)"), highlight=False, markup=False)
    if swept:
        note(f"removed {len(swept)} stale temporary folder(s) left by killed builds")


@cache_app.command("clear")
@user_errors
def cache_clear_cmd(models: List[str] = typer.Argument(None, help="only these models' artifacts (default: everything)")):
    """Delete the cache: every artifact, trained weight and data cache, or only the named models' artifacts."""
    from ..pipeline.formatting import fmt_bytes
    from ..pipeline.variants import clear_cache
    from ..utils import cache_root

    n, freed = clear_cache(models or None)
    out.print(f"removed {n} {'variant folder(s)' if models else 'cache entr(ies)'} from {cache_root()} "
              f"({fmt_bytes(freed)} freed)", highlight=False, markup=False)
