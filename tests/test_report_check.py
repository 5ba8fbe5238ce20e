"""The report (JSON schema, Markdown, cache reuse) and the CI gate."""
import json

import pytest

from deepship.errors import GateError
from deepship.models import resolve
from deepship.pipeline.check import Budget, check, load_report, to_markdown
from deepship.pipeline.report import SCHEMA_VERSION, run_report


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    # family "": no family adapter, so without the prune/distill chains the zoo adds: the test stays small
    rep = run_report([resolve("mlp").replace(family=""), resolve("lstm").replace(family="")], out_dir=d, batches=(1, 4), min_time_s=0.02,
                     methods=["int8-dynamic", "fp16"], show_progress=False)
    return d, rep


def test_report_json_and_markdown(small_report):
    d, rep = small_report
    on_disk = json.loads((d / "report.json").read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert {"cpu", "versions", "date"} <= set(on_disk["machine"])
    assert set(on_disk["machine"]["versions"]) >= {"torch", "onnx", "onnxruntime"}
    for mod in on_disk["models"]:
        names = [v["variant"] for v in mod["variants"]]
        assert names[0] == "fp32-torch" and "fp32-onnx" in names and "int8-dynamic" in names
        for v in mod["variants"]:
            assert v["status"] == "ok", v.get("error")
            assert v["size_bytes"] > 0
            lat = v["latency_ms"]["4"]
            assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["throughput"] > 0
            assert v["metric"] is not None
    lstm = next(m for m in on_disk["models"] if m["model"] == "lstm")
    assert lstm["metric"]["higher_is_better"] is False
    assert lstm["baselines"][0]["name"].startswith("ARIMA")
    md = (d / "report.md").read_text()
    assert "## mlp" in md and "## lstm" in md and "ARIMA" in md and "p50 ms b1" in md
    assert any(v.get("pareto") for m in on_disk["models"] for v in m["variants"])


def test_rerun_reuses_cached_artifacts(small_report, tmp_path):
    from pathlib import Path

    d, rep = small_report
    arts = {v["variant"]: Path(v["artifact"]) for v in rep["models"][0]["variants"] if v["variant"] != "fp32-torch"}
    before = {k: p.stat().st_mtime_ns for k, p in arts.items()}
    rep2 = run_report([resolve("mlp").replace(family="")], out_dir=tmp_path, batches=(1,), min_time_s=0.01,
                      methods=["int8-dynamic", "fp16"], show_progress=False)
    a2 = {v["variant"]: Path(v["artifact"]) for v in rep2["models"][0]["variants"]}
    for k, p in arts.items():
        assert a2[k] == p, k  # same content-addressed folder
        assert p.stat().st_mtime_ns == before[k], f"{k} was rebuilt"


def test_corrupted_cache_entry_is_rebuilt(tmp_path):
    from deepship import api

    ctx = api.load("gru")
    v = api.quantize(ctx, "int8-dynamic")
    v.path.write_bytes(b"corrupt")
    ctx2 = api.load("gru")
    v2 = api.quantize(ctx2, "int8-dynamic")
    assert v2.path.read_bytes()[:7] != b"corrupt"
    ctx2.session(v2)  # loads


def _mutated(rep, model, variant, **changes):
    import copy

    r = copy.deepcopy(rep)
    for m in r["models"]:
        for v in m["variants"]:
            if m["model"] == model and v["variant"] == variant:
                v.update(changes)
    return r


def test_gate_passes_on_identical_reports(small_report):
    _, rep = small_report
    res = check(rep, rep, Budget(max_drop=0.5, latency_tolerance=0.1))
    assert res.ok and "passed" in to_markdown(res)


def test_gate_respects_metric_direction(small_report):
    _, rep = small_report
    mlp = next(v for m in rep["models"] if m["model"] == "mlp" for v in m["variants"] if v["variant"] == "int8-dynamic")
    lstm = next(v for m in rep["models"] if m["model"] == "lstm" for v in m["variants"] if v["variant"] == "fp16")
    # accuracy down 2 points: over a 1-point budget
    worse = _mutated(rep, "mlp", "int8-dynamic", metric=mlp["metric"] - 0.02)
    res = check(worse, rep, Budget(max_drop=1.0))
    assert not res.ok and "mlp/int8-dynamic" in res.failures[0] and "accuracy" in res.failures[0]
    # accuracy up: fine
    assert check(_mutated(rep, "mlp", "int8-dynamic", metric=mlp["metric"] + 0.02), rep, Budget(max_drop=1.0)).ok
    # MAE up 10% (worse) fails a 5% relative budget; MAE down passes
    res = check(_mutated(rep, "lstm", "fp16", metric=lstm["metric"] * 1.1), rep, Budget(max_rel_drop=0.05))
    assert not res.ok and "lstm/fp16" in res.failures[0]
    assert check(_mutated(rep, "lstm", "fp16", metric=lstm["metric"] * 0.9), rep, Budget(max_rel_drop=0.05)).ok


def test_gate_latency_missing_and_toml(small_report, tmp_path, cli):
    d, rep = small_report
    slow = json.loads(json.dumps(rep))
    for m in slow["models"]:
        for v in m["variants"]:
            for lat in v["latency_ms"].values():
                lat["p50_ms"] *= 3
    res = check(slow, rep, Budget(latency_tolerance=0.5))
    assert not res.ok and "latency" in res.failures[0]
    # the noise floor: a 3x rise fails only where it is more than floor ms
    rises = [(v["variant"], b, 2 * t["p50_ms"]) for m in rep["models"] for v in m["variants"]
             for b, t in v["latency_ms"].items()]
    floor = sorted(r[2] for r in rises)[len(rises) // 2]
    res = check(slow, rep, Budget(latency_tolerance=0.5, latency_floor_ms=floor))
    assert 0 < len(res.failures) < len(rises)
    assert len(res.failures) == sum(r[2] > floor for r in rises)
    other_cpu = json.loads(json.dumps(slow))
    other_cpu["machine"]["cpu"] = "some other CPU"
    assert check(other_cpu, rep, Budget(latency_tolerance=0.5)).ok  # not comparable: noted, not failed
    missing = json.loads(json.dumps(rep))
    missing["models"][0]["variants"] = missing["models"][0]["variants"][:1]
    assert any("missing" in f for f in check(missing, rep, Budget()).failures)

    (tmp_path / "new.json").write_text(json.dumps(_mutated(rep, "mlp", "int8-dynamic", metric=0.0)))
    (tmp_path / "budgets.toml").write_text('[default]\nmax_drop = 1.0\n[variants."lstm/fp16"]\nmax_rel_drop = 0.5\n')
    code, out, err = cli("check", tmp_path / "new.json", "--baseline", d / "report.json",
                         "--budgets", tmp_path / "budgets.toml", "--summary", tmp_path / "summary.md")
    assert code == 1
    assert "FAILED" in out and "mlp/int8-dynamic" in err
    assert (tmp_path / "summary.md").read_text().startswith("### deepship accuracy gate")
    code, out, err = cli("check", d / "report.json", "--baseline", d / "report.json", "--max-drop", "0.1")
    assert code == 0 and "passed" in out


def test_gate_refuses_budgets_that_check_nothing(small_report, tmp_path, cli):
    """A budget naming a variant or metric that is in neither report, a negative budget or a string is an
    error (exit 2, one line, brackets shown as written); latency failures get their own table."""
    d, rep = small_report
    rp = d / "report.json"
    cases = [('[variants."mlp/int9"]\nmax_drop = 1.0\n', 'names no variant of the reports; model \'mlp\' has'),
             ('[variants."resnet/fp32-onnx"]\nmax_drop = 1.0\n', "the reports hold the models"),
             ("[metrics.f1]\nmax_drop = 1.0\n", "names no metric"),
             ("[default]\nmax_drop = -1.0\n", "is negative"),
             ('[default]\nmax_drop = "1.0"\n', "is not a number"),
             ("[defaults]\nmax_drop = 1.0\n", "unknown table [defaults]"),
             ("[default\nmax_drop = 1\n", '[variants."model/variant"]')]
    for i, (toml, want) in enumerate(cases):
        (tmp_path / f"b{i}.toml").write_text(toml)
        code, out, err = cli("check", rp, "--baseline", rp, "--budgets", tmp_path / f"b{i}.toml")
        text = " ".join((out + err).split())
        assert code == 2 and text.startswith("error:") and want in text and "Traceback" not in text, (toml, text)
    code, out, err = cli("check", rp, "--baseline", rp, "--max-drop", "-2")
    assert code == 2 and "is negative" in err
    slow = json.loads(json.dumps(rep))
    slow["models"][0]["variants"][1]["latency_ms"]["1"]["p50_ms"] *= 5
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    code, out, err = cli("check", tmp_path / "slow.json", "--baseline", rp, "--latency-tolerance", "0.5")
    assert code == 1 and "| variant | batch | baseline ms | new ms | change | tolerance | status |" in out


def test_gate_bad_files(tmp_path, cli):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(GateError, match="not valid JSON"):
        load_report(tmp_path / "x.json")
    (tmp_path / "v9.json").write_text(json.dumps({"schema_version": 99, "models": []}))
    with pytest.raises(GateError, match="schema 99"):
        load_report(tmp_path / "v9.json")
    code, out, err = cli("check", tmp_path / "missing.json", "--baseline", tmp_path / "x.json")
    assert code == 2 and "not found" in err


def test_benchmark_harness_stats(zoo_ctx):
    from deepship.runtimes.benchmark import measure

    ctx = zoo_ctx("mlp")
    s = ctx.session(ctx.baseline())
    st = measure(s, ctx.spec.example_inputs({"batch": 8}), min_iters=15, min_time_s=0.0, warmup=2)
    assert st.iters == 15 and st.batch == 8 and st.threads >= 1
    assert st.p50_ms <= st.p90_ms <= st.p99_ms
    assert st.throughput == pytest.approx(8 / (st.p50_ms / 1e3))
