"""``report.html``: the report as one self-contained page with plots (plotly, its script inlined: no
network), and the side-by-side comparison of two reports for a pull request.

Per model: the Pareto plot of p50 latency (log scale, one series per batch size) against the metric's
change from FP32 PyTorch (or, without a metric, the output drift), with the front drawn and every
point labelled by variant and hover text naming its parent chain; size bars; tokens/s against batch
and the speculative acceptance rate for decoders; real-time factor and per-chunk p99 for streaming
ASR; a per-layer sensitivity chart where the model's section has one; and a sortable table of every
variant. Plots are plotly figures (``plotly.graph_objects``); the page's only hand-written script
sorts the tables.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..utils import write_text_atomic
from .check import Budget, GateResult, check
from .formatting import fmt_bytes, fmt_change, fmt_metric, notes

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th) {
  th.addEventListener('click', function () {
    var col = th.cellIndex, table = th.closest('table'), body = table.tBodies[0], asc = th.dataset.asc !== '1';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    table.querySelectorAll('th').forEach(function (h) { delete h.dataset.asc; });
    if (asc) { th.dataset.asc = '1'; }
  });
});
"""

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:36px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px} table{border-collapse:collapse;font-size:12px;margin:12px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right} th{background:#f4f4f4;cursor:pointer}
td.l,th.l{text-align:left} tr.bad td{background:#fde8e8} .row{display:flex;flex-wrap:wrap;gap:8px}
"""


def _chain(rows: dict[str, dict], name: str) -> str:
    out, cur, seen = [], rows.get(name), set()
    while cur is not None and cur["variant"] not in seen:
        seen.add(cur["variant"])
        out.append(cur["variant"])
        cur = rows.get(cur.get("parent") or "")
    return " <- ".join(out)


def _y(row: dict, metric: dict | None) -> float | None:
    if metric is not None:
        ch = row.get("metric_change")
        return None if ch is None else ch * metric.get("scale", 1.0)
    d = row.get("drift") or {}
    return d.get("max_abs", 0.0 if row.get("stage") == "baseline" else None)


def _front(points: list[tuple[float, float, str]], higher_is_better: bool) -> list[tuple[float, float, str]]:
    sign = 1 if higher_is_better else -1
    front = [p for p in points if not any(q[0] <= p[0] and sign * q[1] >= sign * p[1] and
                                          (q[0] < p[0] or sign * q[1] > sign * p[1]) for q in points)]
    return sorted(front)


def model_figures(mod: dict, batches: list[str]) -> list[Any]:
    """The plotly figures of one model's section (Pareto, sizes, and per-kind extras)."""
    import plotly.graph_objects as go

    met = mod.get("metric")
    ok = [r for r in mod["variants"] if r.get("status") == "ok"]
    by_name = {r["variant"]: r for r in mod["variants"]}
    ylab = (f"{met['name']} change vs FP32 PyTorch ({'pt' if met.get('unit') == '%' else met['name']}; "
            f"{'higher' if met['higher_is_better'] else 'lower'} is better)") if met else "output drift (max abs) vs FP32"
    hib = met["higher_is_better"] if met else False
    from plotly.subplots import make_subplots

    pareto = make_subplots(rows=1, cols=max(1, len(batches)), shared_yaxes=True, horizontal_spacing=0.04,
                           subplot_titles=[f"batch {b}" for b in batches])
    number = {r["variant"]: i for i, r in enumerate(mod["variants"], start=1)}  # the table's # column
    positions = ("top center", "bottom center")
    for col, b in enumerate(batches, start=1):
        pts = sorted((r["latency_ms"][b]["p50_ms"], _y(r, met), r["variant"]) for r in ok
                     if "p50_ms" in r.get("latency_ms", {}).get(b, {}) and _y(r, met) is not None)
        fr = _front(pts, hib)
        on_front = {p[2] for p in fr}
        # every point carries its variant's number (the table's # column); front points their name too,
        # so a cluster of ten variants at one accuracy stays readable; hover gives name and chain
        pareto.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+text", name=f"batch {b}",
            text=[f"{number[p[2]]} {p[2]}" if p[2] in on_front else str(number[p[2]]) for p in pts],
            textposition=[positions[k % len(positions)] for k in range(len(pts))],
            textfont={"size": 9}, marker={"size": 8},
            customdata=[[_chain(by_name, p[2]), by_name[p[2]].get("format", ""), by_name[p[2]].get("precision", ""),
                         p[2]] for p in pts],
            hovertemplate="%{customdata[3]}<br>%{customdata[0]}<br>%{customdata[1]} %{customdata[2]}<br>"
                          "p50 %{x:.3f} ms<br>change %{y:.4g}<extra>batch " + b + "</extra>"), row=1, col=col)
        pareto.add_trace(go.Scatter(x=[p[0] for p in fr], y=[p[1] for p in fr], mode="lines+markers",
                                    line={"dash": "dot", "width": 1, "color": "#444"},
                                    marker={"size": 12, "symbol": "circle-open", "color": "#444"},
                                    name="Pareto front", legendgroup="front", showlegend=col == 1, hoverinfo="skip"),
                         row=1, col=col)
        pareto.update_xaxes(type="log", dtick="D2", title_text="p50 latency per call, ms (log)", row=1, col=col)
    pareto.update_yaxes(title_text=ylab, row=1, col=1)
    pareto.update_layout(title=f"{mod['model']}: latency against {met['name'] if met else 'drift'} "
                               "(each point a variant, numbered as in the table; hover for its parent chain)",
                         height=480, margin={"t": 70, "l": 60, "r": 20, "b": 50}, showlegend=True)
    sizes = go.Figure(go.Bar(x=[r["variant"] for r in ok], y=[(r.get("size_bytes") or 0) / 2 ** 20 for r in ok],
                             text=[f"{(r.get('size_bytes') or 0) / 2 ** 20:.2f}" for r in ok]))
    sizes.update_layout(title="size on disk, MiB (external data included)", height=320,
                        margin={"t": 40, "l": 50, "r": 20, "b": 110})
    figs = [pareto, sizes]
    dec = [r for r in ok if any(k.startswith("decode_tok_s_b") for k in (r.get("extra") or {}))]
    if dec:
        f = go.Figure()
        for bk in sorted({k for r in dec for k in r["extra"] if k.startswith("decode_tok_s_b")}, key=lambda k: int(k[14:])):
            f.add_trace(go.Bar(name=f"batch {bk[14:]}", x=[r["variant"] for r in dec], y=[r["extra"].get(bk) for r in dec]))
        acc = [r["extra"].get("acceptance_rate") for r in dec]
        if any(a is not None for a in acc):
            f.add_trace(go.Scatter(name="speculative acceptance", x=[r["variant"] for r in dec], y=acc, yaxis="y2",
                                   mode="markers", marker={"size": 10, "symbol": "diamond"}))
        f.update_layout(title="decoding: tokens/s by batch, speculative acceptance", barmode="group", height=360,
                        yaxis={"title": "tokens/s"}, yaxis2={"title": "acceptance", "overlaying": "y", "side": "right",
                                                             "range": [0, 1]}, margin={"t": 40, "b": 110})
        figs.append(f)
    asr = [r for r in ok if "rtf_1thread" in (r.get("extra") or {})]
    if asr:
        f = go.Figure([go.Bar(name="RTF (1 thread)", x=[r["variant"] for r in asr], y=[r["extra"]["rtf_1thread"] for r in asr]),
                       go.Bar(name="chunk p99, ms", x=[r["variant"] for r in asr], y=[r["extra"].get("chunk_ms_p99") for r in asr],
                              yaxis="y2")])
        f.update_layout(title="streaming: real-time factor and per-chunk p99", barmode="group", height=340,
                        yaxis={"title": "RTF"}, yaxis2={"title": "chunk p99 ms", "overlaying": "y", "side": "right"},
                        margin={"t": 40, "b": 110})
        figs.append(f)
    sens = mod.get("sensitivity")
    if sens:
        f = go.Figure()
        for fmt in sorted({s["format"] for s in sens}):
            rows = [s for s in sens if s["format"] == fmt]
            f.add_trace(go.Bar(name=fmt, x=[s["group"] for s in rows], y=[s["metric_change"] for s in rows]))
        f.update_layout(title="per-layer sensitivity: metric change when only that group is quantized",
                        barmode="group", height=380, margin={"t": 40, "b": 140})
        figs.append(f)
    return figs


def _table(mod: dict, batches: list[str]) -> str:
    met = mod.get("metric")
    hdr = ["#", "variant", "parent", "format", "precision", "size"] + [f"p50 ms b{b}" for b in batches] + \
          [f"speedup b{b}" for b in batches] + [met["name"] if met else "metric", "change", "notes"]
    out = ['<table class="sortable"><thead><tr>' + "".join(
        f'<th class="{"l" if h in ("variant", "parent", "format", "precision", "notes") else ""}">{html.escape(h)}</th>'
        for h in hdr) + "</tr></thead><tbody>"]
    for i, r in enumerate(mod["variants"], start=1):
        lat = r.get("latency_ms", {})
        cells = [(str(i), i, ""), (r["variant"], None, "l"), (r.get("parent") or "-", None, "l"), (r.get("format", "-"), None, "l"),
                 (r.get("precision", "-"), None, "l"), (fmt_bytes(r.get("size_bytes")), r.get("size_bytes") or 0, "")]
        cells += [(f"{lat[b]['p50_ms']:.3f}" if "p50_ms" in lat.get(b, {}) else "-",
                   lat.get(b, {}).get("p50_ms", ""), "") for b in batches]
        cells += [(f"{r['speedup'][b]:.2f}x" if b in r.get("speedup", {}) else "-", r.get("speedup", {}).get(b, ""), "")
                  for b in batches]
        cells += [(fmt_metric(r.get("metric"), met), r.get("metric", ""), ""), (fmt_change(r, met), r.get("metric_change", ""), ""),
                  (notes(r), None, "l")]
        cls = ' class="bad"' if r.get("status") != "ok" else ""
        out.append(f"<tr{cls}>" + "".join(
            f'<td class="{c}"' + (f' data-v="{html.escape(str(v))}"' if v not in (None, "") else "") + f">{html.escape(str(t))}</td>"
            for t, v, c in cells) + "</tr>")
    return "\n".join(out) + "</tbody></table>"


def comparison_section(report: dict, baseline: dict, gate: GateResult | None = None,
                       latency_tolerance: float = 0.1) -> str:
    """Two runs side by side, regressions first: every variant of either report, its metric and p50
    at each batch in both. Rows are marked as ``gate`` (the result of ``optimize check`` with its
    budgets) failed them; without one, when the metric got worse at all or p50 rose more than
    ``latency_tolerance`` (same CPU only, as the gate does)."""
    res = gate if gate is not None else check(report, baseline, Budget(max_drop=0.0, latency_tolerance=latency_tolerance))
    bad = {f.split(":", 1)[0] for f in res.failures}
    new = {f"{m['model']}/{v['variant']}": (m, v) for m in report["models"] for v in m["variants"]}
    old = {f"{m['model']}/{v['variant']}": (m, v) for m in baseline["models"] for v in m["variants"]}
    bs = [str(b) for b in report.get("settings", {}).get("batches", [])]
    keys = sorted(set(new) | set(old), key=lambda k: (k not in bad, k))
    hdr = ["variant", "status", "metric (old)", "metric (new)", "change"] + \
          [f"p50 ms b{b} old / new" for b in bs]
    rows = []
    for k in keys:
        nm, nv = new.get(k, (None, None))
        om, ov = old.get(k, (None, None))
        met = (nm or om or {}).get("metric")
        scale = met.get("scale", 1.0) if met else 1.0
        o = ov.get("metric") if ov else None
        n = nv.get("metric") if nv else None
        status = "regression" if k in bad else ("new" if ov is None else "removed" if nv is None else "ok")
        cells = [k, status, "-" if o is None else f"{o * scale:.4g}", "-" if n is None else f"{n * scale:.4g}",
                 "-" if o is None or n is None else f"{(n - o) * scale:+.3g}"]
        for b in bs:
            lo = (ov or {}).get("latency_ms", {}).get(b, {}).get("p50_ms")
            ln = (nv or {}).get("latency_ms", {}).get(b, {}).get("p50_ms")
            cells.append(f"{lo:.3f} / {ln:.3f}" if lo and ln else "-")
        cls = ' class="bad"' if status == "regression" else ""
        rows.append(f"<tr{cls}>" + "".join(f'<td class="{"l" if i < 2 else ""}">{html.escape(c)}</td>'
                                          for i, c in enumerate(cells)) + "</tr>")
    items = "".join(f"<li>{html.escape(x)}</li>" for x in res.failures + res.notes)
    return (f"<h2>Changes against the baseline ({len(bad)} regression{'s' if len(bad) != 1 else ''})</h2>"
            f"<ul>{items}</ul><table class=\"sortable\"><thead><tr>"
            + "".join(f'<th class="{"l" if i < 2 else ""}">{html.escape(h)}</th>' for i, h in enumerate(hdr))
            + "</tr></thead><tbody>" + "\n".join(rows) + "</tbody></table>")


def render_html(report: dict, baseline: dict | None = None, title: str = "deepship report",
                gate: GateResult | None = None) -> str:
    """The whole page: machine header, the comparison (when ``baseline`` is given; rows marked as
    ``gate`` failed them), then one section per model with its figures and sortable table."""
    from plotly.offline import get_plotlyjs

    m = report.get("machine", {})
    bs = [str(b) for b in report.get("settings", {}).get("batches", [])]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">{html.escape(str(m.get("cpu", "")))} ({m.get("logical_cores", "?")} logical cores; '
             f'{html.escape(str(m.get("cpu_features", "")))}), {report.get("settings", {}).get("threads", "?")} threads. '
             f'{html.escape(str(m.get("date", "")))}. '
             + html.escape(", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())) + "</p>"]
    if baseline is not None:
        parts.append(comparison_section(report, baseline, gate))
    for i, mod in enumerate(report.get("models", [])):
        met = mod.get("metric")
        parts.append(f'<h2 id="model-{i}">{html.escape(mod["model"])}</h2><p class="meta">'
                     f'{html.escape(mod.get("description", ""))}. Data: {html.escape(str(mod.get("data", "")))}. '
                     f'Metric: {html.escape(met["name"] if met else "output drift vs FP32")}.</p><div class="row">')
        for j, fig in enumerate(model_figures(mod, bs)):
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{i}-{j}",
                                     config={"displaylogo": False, "responsive": True}))
        parts.append("</div>" + _table(mod, bs))
    meta = json.dumps({"models": [{"model": mod["model"], "plot": f"plot-{i}-0",
                                   "variants_plotted": sum(1 for r in mod["variants"] if r.get("status") == "ok")}
                                  for i, mod in enumerate(report.get("models", []))]})
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>"
            f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body>" + "\n".join(parts)
            + f'<script id="deepship-meta" type="application/json">{meta}</script>'
            + f"<script>{_SORT_JS}</script></body></html>")


def write_html(report: dict, path: str | Path, baseline: dict | None = None, title: str = "deepship report",
               gate: GateResult | None = None) -> Path:
    """Write :func:`render_html` to ``path`` atomically; returns the path."""
    return write_text_atomic(path, render_html(report, baseline, title, gate))
