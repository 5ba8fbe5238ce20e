"""report.html: one self-contained page with plotly figures, checked in headless Chromium; the
comparison of two runs (``report --compare``, ``check --html``); ``report --json``."""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

from deepship.models import resolve
from deepship.pipeline.report import run_report, summary
from deepship.pipeline.report_html import render_html, write_html

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).is_file()),
                shutil.which("chromium"))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    # family "": no family adapter, so the zoo's prune/distill chains stay out and the test stays small
    rep = run_report([resolve("mlp").replace(family=""), resolve("gru").replace(family="")], out_dir=d,
                     batches=(1, 8), min_time_s=0.02, methods=["int8-dynamic", "fp16"], show_progress=False)
    return d, rep


def _meta(page_html: str) -> dict:
    m = re.search(r'<script id="deepship-meta" type="application/json">(.*?)</script>', page_html, re.S)
    assert m, "no metadata block"
    return json.loads(m.group(1))


def test_page_is_self_contained(two_models):
    d, rep = two_models
    page = (d / "report.html").read_text()
    assert page.startswith("<!doctype html>")
    # no network: no script or stylesheet is fetched, plotly's bundle is inline
    assert not re.search(r'<script[^>]+src=', page) and not re.search(r'<link[^>]+href=["\']https?:', page)
    assert "Plotly" in page and len(page) > 1_000_000
    meta = _meta(page)
    assert [m["model"] for m in meta["models"]] == ["mlp", "gru"]
    for m, mod in zip(meta["models"], rep["models"]):
        assert m["variants_plotted"] == sum(v["status"] == "ok" for v in mod["variants"]) >= 4
        assert f'id="{m["plot"]}"' in page
    # the sortable table lists every variant with its chain
    for mod in rep["models"]:
        for v in mod["variants"]:
            assert f">{v['variant']}</td>" in page


def test_comparison_puts_regressions_first(two_models, tmp_path):
    _, rep = two_models
    new = copy.deepcopy(rep)
    row = next(v for v in new["models"][0]["variants"] if v["variant"] == "fp16")
    row["metric"] -= 0.05  # five points of accuracy lost
    page = render_html(new, baseline=rep)
    sec = page[page.index("Changes against the baseline"):]
    assert "(1 regression)" in sec
    first_row = re.search(r"<tbody><tr([^>]*)><td[^>]*>([^<]+)</td><td[^>]*>([^<]+)</td>", sec)
    assert first_row.group(2) == "mlp/fp16" and first_row.group(3) == "regression" and "bad" in first_row.group(1)
    assert "mlp/fp16: accuracy worse by" in sec


def test_report_compare_check_html_and_json(two_models, tmp_path, cli):
    d, rep = two_models
    old = tmp_path / "old.json"
    worse = copy.deepcopy(rep)
    for v in worse["models"][0]["variants"]:
        if v["variant"] == "int8-dynamic":
            v["metric"] += 0.5  # the old run was better: the new one regresses
    old.write_text(json.dumps(worse))
    page = tmp_path / "gate.html"
    code, stdout, stderr = cli("check", d / "report.json", "--baseline", old, "--max-drop", "1", "--html", page)
    assert code == 1, stderr
    html = page.read_text()
    assert "Changes against the baseline (1 regression)" in html and "mlp/int8-dynamic" in html
    # --compare validates the old report before any work; --json: the summary on stdout only
    bad = tmp_path / "nope.json"
    code, _, stderr = cli("report", "mlp", "--compare", bad, "--out", tmp_path / "r")
    assert code == 2 and "nope.json not found" in stderr and not (tmp_path / "r").exists()
    s = summary(rep, d)
    assert s["files"]["html"].endswith("report.html") and s["failed"] == []
    assert {v["variant"] for v in s["models"][0]["variants"]} >= {"fp32-torch", "fp32-onnx", "int8-dynamic", "fp16"}
    json.dumps(s)


def test_report_json_flag_prints_only_json(tmp_path, cli):
    # one real run through the CLI (mlp with its zoo family: prune and distill rows too)
    code, stdout, stderr = cli("report", "mlp", "--methods", "int8-dynamic", "--batches", "1", "--min-time", "0.01",
                               "--out", tmp_path / "r", "--json")
    assert code == 0, stderr
    s = json.loads(stdout)
    assert s["files"]["html"] == str(tmp_path / "r" / "report.html") and (tmp_path / "r" / "report.html").is_file()
    assert "wrote" in stderr


def test_sensitivity_chart_when_present(two_models):
    _, rep = two_models
    r = copy.deepcopy(rep)
    r["models"][0]["sensitivity"] = [{"group": "fc1", "format": "int8", "metric_change": -0.01},
                                     {"group": "fc2", "format": "int8", "metric_change": -0.002}]
    page = render_html(r)
    assert "per-layer sensitivity" in page and "per-layer sensitivity" not in render_html(rep)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is missing (make test installs Debian's chromium)")
def test_renders_in_headless_chromium(two_models, tmp_path):
    pytest.importorskip("playwright", reason="playwright is missing (pip install -e '.[test]')")
    from playwright.sync_api import sync_playwright

    d, rep = two_models
    page_path = write_html(rep, tmp_path / "report.html", baseline=rep)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: errors.append(f"network request {r.url}") if not r.url.startswith("file:") else None)
        page.goto(page_path.resolve().as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 0")
        meta = json.loads(page.locator("#deepship-meta").text_content())
        for m, mod in zip(meta["models"], rep["models"]):
            # every batch panel of the Pareto plot has one point per variant, rendered as SVG
            counts = page.evaluate(f"""() => {{ const g = document.getElementById('{m["plot"]}');
                return g.data.filter(t => t.mode === 'markers+text').map(t => t.x.length); }}""")
            assert counts == [m["variants_plotted"]] * len(rep["settings"]["batches"]), (m, counts)
            drawn = page.evaluate(f"document.getElementById('{m['plot']}').querySelectorAll('.scatterlayer .point').length")
            assert drawn >= m["variants_plotted"] * len(rep["settings"]["batches"])
        # the table sorts on a header click (size column, ascending)
        page.locator("table.sortable").nth(1).locator("th", has_text="size").click()
        sizes = page.locator("table.sortable").nth(1).locator("tbody tr td:nth-child(6)").evaluate_all(
            "tds => tds.map(td => parseFloat(td.dataset.v))")
        assert sizes == sorted(sizes)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
