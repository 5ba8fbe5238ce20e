"""Formatting of report rows for people (Markdown, HTML, the gate's summary): sizes, metrics, changes,
latency cells and the notes column. Pure functions over the report's JSON rows: no torch, no runtimes."""
from __future__ import annotations


def describe_nodes(info: dict) -> str:
    """One line: ``quantized Conv x2, Gemm x2; kept FP32: LSTM x1``."""
    q = ", ".join(f"{k} x{v}" for k, v in sorted(info.get("quantized", {}).items())) or "none"
    k = ", ".join(f"{k} x{v}" for k, v in sorted(info.get("kept_fp32", {}).items()))
    return f"quantized {q}" + (f"; kept FP32: {k}" if k else "")


def fmt_bytes(n: int | None) -> str:
    """``n`` bytes as ``"812 B"``, ``"1.4 MB"``; ``"-"`` for 0 or None."""
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_metric(value: float | None, metric: dict | None) -> str:
    """A metric value in its display scale (``metric["scale"]``, ``%`` appended for percentages)."""
    if value is None or metric is None:
        return "-"
    s = metric.get("scale", 1.0)
    return f"{value * s:.2f}{metric.get('unit', '') if metric.get('unit') == '%' else ''}"


def fmt_change(row: dict, metric: dict | None) -> str:
    """The row's metric change against its baseline: ``"-0.40 pt"`` for percentages, else
    ``"+0.0123 (+1.5%)"`` with the relative change."""
    if metric is None or row.get("metric_change") is None:
        return "-"
    d = row["metric_change"] * metric.get("scale", 1.0)
    unit = " pt" if metric.get("unit") == "%" else ""
    rel = row.get("metric_change_rel")
    return f"{d:+.2f}{unit}" + (f" ({rel * 100:+.1f}%)" if rel is not None and metric.get("unit") != "%" else "")


def lat_cell(row: dict, b: str, key: str = "p50_ms") -> str:
    """Latency (ms) of ``row`` at batch ``b`` for ``key`` (``p50_ms``, ``p99_ms``), ``"-"`` if absent."""
    v = row.get("latency_ms", {}).get(b, {}).get(key)
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def notes(row: dict) -> str:
    """The notes column: quantized node types, calibration, parity, engine, drift, extras, Pareto."""
    if row.get("status") != "ok":
        return f"FAILED: {row.get('error', '')}"
    info = row.get("info", {})
    out: list[str] = []
    if "nodes" in info and row.get("stage") == "quantize":
        out.append(describe_nodes(info["nodes"]))
    if "calibration" in info:
        cal = info.get("calibration_data")
        out.append(f"{info['calibration']} calibration" + (f" on {cal}" if cal else ""))
    if "parity" in info:
        p = info["parity"].get("second_shape", {})
        out.append(f"parity max abs {p.get('max_abs', 0):.1e} at {p.get('shape')}")
    if row.get("stage") == "engine":
        out.append(f"{row.get('method')} engine, {row.get('precision')}, ran on {row.get('provider')}")
        if info.get("static_dims"):
            out.append("static " + ", ".join(f"{k}={v}" for k, v in info["static_dims"].items()))
    d = row.get("drift")
    if d and "top1_agreement" in d and row.get("stage") != "baseline":
        out.append(f"top-1 agree {d['top1_agreement'] * 100:.1f}%")
    elif d and row.get("stage") != "baseline":
        out.append(f"drift max abs {d.get('max_abs', 0):.2g}")
    for k, val in (row.get("extra") or {}).items():
        out.append(f"{k} {val:.4g}" if isinstance(val, float) else f"{k} {val}")
    if info.get("warning"):
        out.append(info["warning"])
    if row.get("pareto"):
        out.append("**Pareto**")
    return "; ".join(out)
