"""The recipe and the reports of ``optimize tune`` (:mod:`deepship.pipeline.tune`): ``recipe.toml``,
which lists the model and each build step with its cache key and its artifact's SHA-256, and
:func:`build_recipe`, which replays it (``optimize build``) and fails when a key or the bytes differ
(another library version, other data or weights, or a non-deterministic writer would not build the same
artifact); ``tune.json``, ``tune.md`` and ``tune.html`` of a tune result.

Libraries: ``tomli_w`` writes the recipe, ``tomllib`` reads it; plotly draws ``tune.html``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import StageError
from ..utils import first_line, sha256_file, write_json_atomic, write_text_atomic
from .context import ModelContext
from .variants import Variant


def artifact_digest(v: Variant) -> str | None:
    """SHA-256 over a variant's artifact files (``name:sha256`` lines, in ``files`` order); ``None`` for an
    in-memory variant. One file: that file's own SHA-256, so ``sha256sum model.onnx`` shows the same."""
    if not v.dir or not v.files:
        return None
    sums = [(f, sha256_file(Path(v.dir) / f)) for f in v.files if (Path(v.dir) / f).is_file()]
    if len(sums) == 1:
        return sums[0][1]
    return hashlib.sha256("".join(f"{f}:{h}\n" for f, h in sums).encode()).hexdigest()


RECIPE_VERSION = 1


def recipe(result: dict[str, Any], model_args: dict[str, Any]) -> dict[str, Any]:
    """The TOML-ready recipe of the chosen trial: ``[model]`` (how to load it), ``[target]`` (what it
    measured), ``[[step]]`` (the build chain with cache keys).

    Raises:
        StageError: the result has no chosen variant.
    """
    c = next((t for t in result["trials"] if t["name"] == result["chosen"]), None)
    if c is None:
        raise StageError("no variant met the budget; nothing to write a recipe for (loosen the budget or add backends)")
    clean = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731 (TOML has no null)
    return {
        "recipe_version": RECIPE_VERSION,
        "model": clean(dict(model_args)),
        "target": clean({"variant": c["name"], "metric": c["metric"], "drop": c["drop"], "latency_ms": c["latency_ms"],
                         "batch": result["batch"], "size_bytes": c["size_bytes"], "objective": result["objective"],
                         "extra": {k: v for k, v in c["extra"].items() if isinstance(v, (int, float))},
                         "budget": clean({"max_drop": result["budget"]["max_drop"],
                                          "max_rel_drop": result["budget"]["max_rel_drop"],
                                          "require": [f"{k}{op}{v:g}" for k, (op, v) in result["budget"]["require"].items()]})}),
        "step": [clean({**s, "parent": s["parent"] or "fp32-torch"}) for s in c["steps"]],
    }


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Parse and check a ``recipe.toml``.

    Raises:
        StageError: missing file, not TOML, or missing ``[model]``/``[[step]]`` fields.
    """
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise StageError(f"recipe {p} does not exist; write one with optimize tune")
    try:
        r = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"recipe {p} is not TOML: {first_line(e, 160)}") from None
    if "ref" not in r.get("model", {}):
        raise StageError(f"recipe {p} has no [model] ref = ...; write it with optimize tune")
    steps = r.get("step") or []
    for i, s in enumerate(steps):
        missing = [k for k in ("name", "stage", "method", "parent") if k not in s]
        if missing:
            raise StageError(f"recipe {p}: step {i + 1} has no {missing[0]}")
    if r.get("recipe_version", RECIPE_VERSION) > RECIPE_VERSION:
        raise StageError(f"recipe {p} is version {r['recipe_version']}; this deepship reads {RECIPE_VERSION}")
    return r


def build_recipe(ctx: ModelContext, r: dict[str, Any], strict: bool = True) -> tuple[Variant, list[str]]:
    """Rebuild the recipe's steps on ``ctx`` (the model its ``[model]`` names), in order.

    Returns:
        (the last step's variant, warnings: keys that differ when ``strict`` is off).

    Raises:
        StageError: a step fails, or (``strict``) a step's cache key differs from the recipe's: the
            artifact would not be the same (other library versions, data or weights).
    """
    warnings = []
    v = ctx.baseline()
    for s in r.get("step", []):
        par = ctx.baseline() if s["parent"] in ("fp32-torch", "baseline") else ctx.get(s["parent"])
        v = ctx.build(s["name"], s["stage"], s["method"], dict(s.get("params", {})), par)
        if s.get("key") and v.key != s["key"]:
            msg = (f"step {s['name']} builds key {v.key} but the recipe has {s['key']}: other library versions, "
                   "weights or data; rebuild with --no-strict to accept, or re-run optimize tune")
            if strict:
                raise StageError(msg)
            warnings.append(msg)
        digest = artifact_digest(v)
        if s.get("sha256") and digest and digest != s["sha256"]:
            msg = (f"step {s['name']} rebuilt the same key but other bytes (sha256 {digest[:12]}, recipe "
                   f"{s['sha256'][:12]}): a non-deterministic writer; rebuild with --no-strict to accept")
            if strict:
                raise StageError(msg)
            warnings.append(msg)
    return v, warnings


def write_outputs(result: dict[str, Any], out_dir: str | Path, model_args: dict[str, Any]) -> dict[str, Path]:
    """``tune.json``, ``tune.md``, ``tune.html`` and (when a variant was chosen) ``recipe.toml`` in
    ``out_dir``, each written atomically."""
    import tomli_w

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "tune.json", "md": out / "tune.md", "html": out / "tune.html"}
    write_json_atomic(paths["json"], result)
    write_text_atomic(paths["md"], to_markdown(result))
    write_text_atomic(paths["html"], to_html(result))
    if result["chosen"]:
        paths["recipe"] = out / "recipe.toml"
        write_text_atomic(paths["recipe"], tomli_w.dumps(recipe(result, model_args)))
    return paths


def _fmt(x: Any, nd: int = 4) -> str:
    return "-" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))


def to_markdown(result: dict[str, Any]) -> str:
    """The tried variants (uniform, mixed) as a table, Pareto and chosen marked, and the sensitivity table."""
    b = result["budget"]
    bud = ", ".join([f"{k} {b[k]:g}" for k in ("max_drop", "max_rel_drop") if b[k] is not None]
                    + [f"{k} {op} {v:g}" for k, (op, v) in b["require"].items()])
    lines = [f"# optimize tune {result['model']}", "",
             f"Objective: {result['objective']} (p50 ms at batch {result['batch']}" if result["objective"] == "latency"
             else "Objective: size (bytes)", ]
    if result["objective"] == "latency":
        lines[-1] += ")"
    lines += [f"Budget: {bud}; baseline {result['metric']} = {_fmt(result['base_metric'])}",
              f"Chosen: **{result['chosen'] or 'none met the budget'}**; searched in {result['elapsed_s']} s", "",
              "| variant | kind | backend | precision | p50 ms | size | metric | drop | extra | meets | Pareto |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in result["trials"]:
        if t["kind"] == "sensitivity":
            continue
        ex = ", ".join(f"{k} {v}" for k, v in t["extra"].items())
        mark = "**chosen**" if t["name"] == result["chosen"] else ("yes" if t["pareto"] else "")
        lines.append(f"| {t['name']} | {t['kind']} | {t['backend']} | {t['precision']} | {_fmt(t['latency_ms'])} | "
                     f"{t['size_bytes']:,} | {_fmt(t['metric'], 5)} | {_fmt(t['drop'])} | {ex} | "
                     f"{'yes' if t['meets'] else (t['error'][:80] or t['why'])} | {mark} |")
    for base, rows in result["sensitivity"].items():
        lines += ["", f"## Sensitivity of {base}: each layer quantized alone", "",
                  "| layer | op | MAC share | drop | proxy cosine | proxy rel. MSE |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['layer']} | {r['op']} | {r['macs_share']:.3f} | {_fmt(r['drop'])} | "
                         f"{_fmt(r['proxy'].get('cosine'), 6)} | {_fmt(r['proxy'].get('rel_mse'))} |")
    if result["verification"]:
        lines += ["", "Interleaved re-timing (p50 ms per round): "
                  + "; ".join(f"{n} {v['p50_ms_rounds']}" for n, v in result["verification"].items())]
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    m = result["machine"]
    lines += ["", f"Machine: {m.get('cpu', '')} ({m.get('cpu_features', '')}), {m.get('logical_cores', '')} logical cores, "
              f"load average {result.get('load_avg', '')}; {m.get('date', '')}"]
    return "\n".join(lines) + "\n"


def to_html(result: dict[str, Any]) -> str:
    """Two plotly charts: latency (or size) against drop for every trial, and per-layer sensitivity."""
    import plotly.graph_objects as go

    parts = [f"<html><head><meta charset='utf-8'><title>tune {result['model']}</title></head><body>"
             f"<h1>optimize tune {result['model']}</h1><p>chosen: {result['chosen']}</p>"]
    pts = [t for t in result["trials"] if t["kind"] != "sensitivity" and not t["error"] and t["drop"] is not None]
    y = "latency_ms" if result["objective"] == "latency" else "size_bytes"
    fig = go.Figure()
    for kind in ("baseline", "uniform", "mixed"):
        sel = [t for t in pts if t["kind"] == kind]
        if sel:
            fig.add_trace(go.Scatter(x=[t["drop"] for t in sel], y=[t[y] for t in sel], mode="markers",
                                     name=kind, text=[t["name"] for t in sel]))
    fig.update_layout(xaxis_title=f"drop in {result['metric']}", yaxis_title=y, title="what tune tried")
    parts.append(fig.to_html(full_html=False, include_plotlyjs=True))
    for base, rows in result["sensitivity"].items():
        f2 = go.Figure(go.Bar(x=[r["layer"] for r in rows], y=[r["drop"] or 0 for r in rows], name="metric drop"))
        f2.update_layout(title=f"sensitivity of {base}: drop with only this layer INT8", yaxis_title="drop")
        parts.append(f2.to_html(full_html=False, include_plotlyjs=False))
    parts.append("</body></html>")
    return "\n".join(parts)
