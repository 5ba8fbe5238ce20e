"""``optimize check``: the CI accuracy-regression gate.

Compares a new report with a baseline report, variant by variant (matched on model and variant
name). Budgets, per metric, respect the metric's direction:

- ``max_drop``: largest allowed worsening in the metric's display units (percentage points for
  accuracy, raw units for MAE);
- ``max_rel_drop``: largest allowed relative worsening (0.02 = 2%);
- ``latency_tolerance``: largest allowed relative increase of p50 latency at any batch size (checked
  only when both reports come from the same CPU model; ``None`` disables it);
- ``latency_floor_ms``: a p50 rise smaller than this many milliseconds is timing noise, not a
  regression, whatever its ratio (a 0.04 ms MLP call that takes 0.07 ms on a loaded runner is +75%;
  ``None`` or 0: every rise over the tolerance counts).

Budgets come from flags or a TOML file::

    [default]
    max_drop = 1.0
    latency_tolerance = 0.5
    latency_floor_ms = 0.1
    [metrics.mae]
    max_rel_drop = 0.05
    [variants."cnn/int8-static"]
    max_drop = 2.0

A variant that is in the baseline but missing or failed in the new report is a failure. Budgets must
be non-negative numbers, and a ``[variants."model/variant"]`` or ``[metrics.NAME]`` table must name a
variant or metric of the reports (a typo would otherwise silently check nothing). Latency failures are
listed in their own table.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GateError
from .formatting import fmt_metric

SUPPORTED_SCHEMAS = (1,)


@dataclass
class Budget:
    """Allowed regression for one metric or variant (``None`` = not checked)."""

    max_drop: float | None = None
    max_rel_drop: float | None = None
    latency_tolerance: float | None = None
    latency_floor_ms: float | None = None


BUDGET_KEYS = ("max_drop", "max_rel_drop", "latency_tolerance", "latency_floor_ms")


def check_budget(b: Budget, where: str) -> Budget:
    """``b`` if every set value is a non-negative number.

    Raises:
        GateError: naming the value and where it was given.
    """
    for k in BUDGET_KEYS:
        v = getattr(b, k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise GateError(f"budget {k} = {v!r} in {where} is not a number; write e.g. {k} = 1.0")
        if v < 0 or v != v:
            raise GateError(f"budget {k} = {v} in {where} is negative; budgets are allowed worsening, >= 0")
    return b


@dataclass
class GateResult:
    """Outcome of :func:`check`: ``failures``, ``rows`` (one per compared variant) and
    ``latency_rows`` (one per variant and batch size whose p50 latency was compared)."""

    failures: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latency_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def load_report(path: str | Path) -> dict:
    """Read a report JSON.

    Raises:
        GateError: missing file, bad JSON, or an unsupported ``schema_version``.
    """
    p = Path(path)
    if not p.is_file():
        raise GateError(f"report {p} not found; run `optimize report` first")
    try:
        r = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError):
        raise GateError(f"{p} is not valid JSON; give a report.json written by `optimize report`") from None
    if not isinstance(r, dict) or "models" not in r:
        raise GateError(f"{p} is not a deepship report (no 'models'); give a report.json written by `optimize report`")
    v = r.get("schema_version")
    if v not in SUPPORTED_SCHEMAS:
        raise GateError(f"{p} has report schema {v}; this deepship reads schema {', '.join(map(str, SUPPORTED_SCHEMAS))}")
    return r


def load_budgets(path: str | Path | None, default: Budget) -> tuple[Budget, dict[str, Budget], dict[str, Budget]]:
    """Read budgets from a TOML file over ``default``; returns ``(default, per metric, per model/variant)``.

    Raises:
        GateError: missing or unreadable TOML, unknown tables or keys, values that are not
            non-negative numbers.
    """
    check_budget(default, "the command line")
    if path is None:
        return default, {}, {}
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise GateError(f"budgets file {p} not found; check the path given to --budgets")
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise GateError(f"cannot read budgets {p}: {e}; write TOML with [default], [metrics.NAME], "
                        '[variants."model/variant"]') from None
    unknown_tables = set(data) - {"default", "metrics", "variants"}
    if unknown_tables:
        raise GateError(f"unknown table [{sorted(unknown_tables)[0]}] in {p}; use [default], [metrics.NAME], "
                        '[variants."model/variant"]')

    def mk(d: Any, base: Budget, where: str) -> Budget:
        if not isinstance(d, dict):
            raise GateError(f"{where} in {p} is not a table; write it as [{where}] with max_drop = ... lines")
        unknown = set(d) - set(BUDGET_KEYS)
        if unknown:
            raise GateError(f"unknown budget key '{sorted(unknown)[0]}' in [{where}] of {p}; use "
                            f"{', '.join(BUDGET_KEYS)}")
        return check_budget(Budget(*(d.get(k, getattr(base, k)) for k in BUDGET_KEYS)), f"[{where}] of {p}")

    dflt = mk(data.get("default", {}), default, "default")
    metrics = {k: mk(v, dflt, f"metrics.{k}") for k, v in data.get("metrics", {}).items()}
    variants = {k: mk(v, dflt, f'variants."{k}"') for k, v in data.get("variants", {}).items()}
    return dflt, metrics, variants


def check(report: dict, baseline: dict, default: Budget, per_metric: dict[str, Budget] | None = None,
          per_variant: dict[str, Budget] | None = None) -> GateResult:
    """Compare ``report`` with ``baseline`` under the budgets; see the module docstring.

    Raises:
        GateError: a per-variant budget naming a variant (or model) in neither report, or a per-metric
            budget naming a metric neither report has.
    """
    per_metric, per_variant = per_metric or {}, per_variant or {}
    known = {f"{m['model']}/{v['variant']}" for r in (report, baseline) for m in r["models"] for v in m["variants"]}
    models = {m["model"] for r in (report, baseline) for m in r["models"]}
    for k in per_variant:
        if k not in known:
            model = k.split("/", 1)[0]
            hint = (f"model '{model}' has {', '.join(sorted(x.split('/', 1)[1] for x in known if x.startswith(model + '/')))}"
                    if model in models else f"the reports hold the models {', '.join(sorted(models))}")
            raise GateError(f'budget [variants."{k}"] names no variant of the reports; {hint}')
    metric_names = {m["metric"]["name"] for r in (report, baseline) for m in r["models"] if m.get("metric")}
    for k in per_metric:
        if k not in metric_names:
            raise GateError(f"budget [metrics.{k}] names no metric of the reports; they use "
                            f"{', '.join(sorted(metric_names)) or 'none'}")
    res = GateResult()
    same_cpu = report.get("machine", {}).get("cpu") == baseline.get("machine", {}).get("cpu")
    if not same_cpu:
        res.notes.append("latency not compared: the reports come from different CPUs "
                         f"({baseline.get('machine', {}).get('cpu')} vs {report.get('machine', {}).get('cpu')})")
    new = {(m["model"], v["variant"]): (m, v) for m in report["models"] for v in m["variants"]}
    for bm in baseline["models"]:
        for bv in bm["variants"]:
            k = (bm["model"], bv["variant"])
            label = f"{k[0]}/{k[1]}"
            if bv.get("status") != "ok":
                continue
            if k not in new:
                res.failures.append(f"{label}: missing from the new report")
                res.rows.append({"variant": label, "status": "missing"})
                continue
            nm, nv = new[k]
            if nv.get("status") != "ok":
                res.failures.append(f"{label}: failed to build: {nv.get('error', '')}")
                res.rows.append({"variant": label, "status": "failed"})
                continue
            metric = nm.get("metric")
            b = per_variant.get(label) or (per_metric.get(metric["name"]) if metric else None) or default
            row = {"variant": label, "status": "ok", "metric": metric, "old": bv.get("metric"), "new": nv.get("metric")}
            if metric and bv.get("metric") is not None and nv.get("metric") is not None:
                sign = 1.0 if metric["higher_is_better"] else -1.0
                worse = sign * (bv["metric"] - nv["metric"])  # > 0: got worse
                scale = metric.get("scale", 1.0)
                row["worse_by"] = worse * scale
                if b.max_drop is not None and worse * scale > b.max_drop + 1e-12:
                    res.failures.append(f"{label}: {metric['name']} worse by {worse * scale:.3g} "
                                        f"({fmt_metric(bv['metric'], metric)} -> {fmt_metric(nv['metric'], metric)}), "
                                        f"budget {b.max_drop:g}")
                    row["status"] = "over budget"
                rel = worse / abs(bv["metric"]) if bv["metric"] else 0.0
                if b.max_rel_drop is not None and rel > b.max_rel_drop + 1e-12:
                    res.failures.append(f"{label}: {metric['name']} worse by {rel * 100:.2f}% relative, "
                                        f"budget {b.max_rel_drop * 100:g}%")
                    row["status"] = "over budget"
            if same_cpu and b.latency_tolerance is not None:
                for bs, lat in (bv.get("latency_ms") or {}).items():
                    old, newl = lat.get("p50_ms"), (nv.get("latency_ms") or {}).get(bs, {}).get("p50_ms")
                    if not (old and newl):
                        continue
                    over = newl > old * (1 + b.latency_tolerance) and newl - old > (b.latency_floor_ms or 0.0)
                    res.latency_rows.append({"variant": label, "batch": bs, "old_ms": old, "new_ms": newl,
                                             "tolerance": b.latency_tolerance, "floor_ms": b.latency_floor_ms,
                                             "status": "over budget" if over else "ok"})
                    if over:
                        res.failures.append(f"{label}: p50 latency at batch {bs} rose {old:.3f} -> {newl:.3f} ms "
                                            f"(+{(newl / old - 1) * 100:.0f}%), tolerance {b.latency_tolerance * 100:g}%"
                                            + (f" and {b.latency_floor_ms:g} ms" if b.latency_floor_ms else ""))
            res.rows.append(row)
    for k in new:
        if not any((bm["model"], bv["variant"]) == k for bm in baseline["models"] for bv in bm["variants"]):
            res.notes.append(f"{k[0]}/{k[1]}: new variant, not in the baseline")
    return res


def to_markdown(res: GateResult) -> str:
    """A summary fit for a pull-request comment."""
    head = "### deepship accuracy gate: " + ("passed" if res.ok else f"FAILED ({len(res.failures)} over budget)")
    lines = [head, "", "| variant | metric | baseline | new | worse by | status |", "|---|---|---|---|---|---|"]
    for r in res.rows:
        m = r.get("metric")
        lines.append(f"| {r['variant']} | {m['name'] if m else '-'} | {fmt_metric(r.get('old'), m)} | "
                     f"{fmt_metric(r.get('new'), m)} | {r.get('worse_by', 0):+.3g} | {r['status']} |")
    slow = [r for r in res.latency_rows if r["status"] != "ok"]
    if res.latency_rows:
        lines += ["", f"Latency (p50, same CPU): {len(slow)} over tolerance of {len(res.latency_rows)} compared", "",
                  "| variant | batch | baseline ms | new ms | change | tolerance | status |", "|---|---|---|---|---|---|---|"]
        for r in slow or res.latency_rows[:0]:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | "
                         f"{(r['new_ms'] / r['old_ms'] - 1) * 100:+.0f}% | {r['tolerance'] * 100:g}%"
                         + (f" and > {r['floor_ms']:g} ms" if r.get("floor_ms") else "") + f" | {r['status']} |")
        if not slow:
            lines.append("| (none over tolerance) | | | | | | |")
    if res.failures:
        lines += ["", "Over budget:"] + [f"- {f}" for f in res.failures]
    if res.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in res.notes]
    return "\n".join(lines) + "\n"
