"""``optimize tune`` and ``optimize build``: budgets, the per-layer search, the recipe round trip."""
from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from deepship import api
from deepship.errors import StageError
from deepship.pipeline import quantize as Q
from deepship.pipeline import recipe as R
from deepship.pipeline import tune as T


def test_budget_parsing_and_one_line_errors(cli, tmp_path):
    assert T.Budget.parse_require(["recall@1>=0.95", " mean cosine <= 1 "]) == {
        "recall@1": (">=", 0.95), "mean cosine": ("<=", 1.0)}
    with pytest.raises(StageError, match="NAME>=VALUE"):
        T.Budget.parse_require(["recall@1=0.95"])
    with pytest.raises(StageError, match="needs a budget"):
        T.Budget().check()
    with pytest.raises(StageError, match="must be a number >= 0"):
        T.Budget(max_drop=-1).check()
    out = tmp_path / "never"
    for args, msg in [((), "needs a budget"), (("--max-drop", "1", "--backends", "tpu"), "not a tune backend"),
                      (("--max-drop", "1", "--objective", "speed"), "is not one of latency, size"),
                      (("--max-drop", "1", "--time-budget", "soon"), "is not a duration"),
                      (("--require", "recall@1"), "NAME>=VALUE")]:
        code, _, err = cli("tune", "mlp", *args, "--out", out)
        assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, (args, err)
    assert not out.exists()


def test_quantizable_layers_have_names_and_costs(zoo_ctx):
    ctx = zoo_ctx("cnn")
    v = api.export(ctx)
    layers = Q.quantizable_layers(v.path)
    ops = {x.op for x in layers}
    assert {"Conv", "Gemm"} <= ops or {"Conv", "MatMul"} <= ops
    assert all(x.name and x.macs >= 1 for x in layers)
    # the second convolution does the most work in this CNN
    assert max(layers, key=lambda x: x.macs).op == "Conv"


def test_gemm_macs_read_the_reduction_axis_under_transb(tmp_path):
    """x (1, 64) -> Gemm with B (16, 64), transB=1 -> MatMul with W (16, 8): 64*16 and 16*8 MACs per sample."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    b = numpy_helper.from_array(np.ones((16, 64), np.float32), "B")
    w = numpy_helper.from_array(np.ones((16, 8), np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "B"], ["h"], name="fc1", transB=1),
         helper.make_node("MatMul", ["h", "W"], ["y"], name="fc2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], [b, w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    macs = {x.name: x.macs for x in Q.quantizable_layers(str(path))}
    assert macs == {"fc1": 64 * 16, "fc2": 16 * 8}


class _FakeTuner(T.Tuner):
    """A tuner whose trials are computed, not built: the metric drops unless every layer of
    ``critical`` stays in float; a layer's sensitivity drop is known. Checks the ranking and bisection."""

    def __init__(self, layers, drops, critical, budget):
        self.ctx = None
        self.budget, self.objective, self.batch = budget, "latency", 1
        self.deadline, self.time_budget_s = float("inf"), 1e9
        self.max_layers, self.sensitivity_samples = 48, 8
        self.trials, self.skipped, self.sensitivity = [], [], {}
        self.progress = lambda s: None
        self.layers, self.drops, self.critical = layers, drops, critical

    def _try(self, kind, backend, name, build, time_it=True, **fields):
        t = T.Trial(name=name, kind=kind, backend=backend, **fields)
        kept = set(t.float_layers)
        if kind == "sensitivity":
            t.drop = self.drops[name]
        else:
            t.drop = 0.0 if self.critical <= kept else 1.0
        t.latency_ms = 1.0 + len(kept)
        self._judge(t)
        self.trials.append(t)
        return t


def test_mixed_search_keeps_the_sensitive_layers_and_no_more(monkeypatch):
    layers = [Q.Layer(f"n{i}", "MatMul", 100.0) for i in range(9)]
    drops = {f"n{i}": 0.0 for i in range(9)}
    drops.update(n2=0.4, n7=0.3, n5=0.01)  # n2 and n7 are what breaks the budget
    tuner = _FakeTuner(layers, drops, {"n2", "n7"}, T.Budget(max_drop=0.1))
    monkeypatch.setattr(T, "quantizable_layers", lambda path: layers)

    class Ctx:
        def get(self, name):
            return type("V", (), {"path": "x.onnx", "name": name})()

    tuner.ctx = Ctx()
    base = T.Trial(name="int8-static", kind="uniform", backend="onnxruntime", precision="int8",
                   steps=[{"stage": "quantize", "method": "int8-static", "params": {}, "parent": "fp32-onnx"}])
    tuner.mixed(base)
    mixed = [t for t in tuner.trials if t.kind == "mixed"]
    best = min((t for t in mixed if t.meets), key=lambda t: t.latency_ms)
    assert set(best.float_layers) == {"n2", "n7"}  # the two sensitive layers, nothing else
    assert len(mixed) <= 4  # bisection over 9 layers, not 9 probes
    assert [r["layer"] for r in tuner.sensitivity["int8-static"]][:9] == [f"n{i}" for i in range(9)]
    # the exclusion each backend takes
    assert T._exclusion_params("openvino", "", ["b", "a"]) == {"ignored": "a,b"}
    assert T._exclusion_params("onnxruntime", "int8-static", ["/l.0/MatMul"]) == {"exclude": [r"^/l\.0/MatMul$"]}


def test_tune_writes_a_recipe_that_build_reproduces(cli, tmp_path, monkeypatch):
    out = tmp_path / "tune"
    code, stdout, err = cli("tune", "mlp", "--max-drop", "1.0", "--backends", "onnxruntime", "--batch", "8",
                            "--time-budget", "5m", "--out", out)
    assert code == 0, err
    assert "Pareto front" in stdout and "<- chosen" in stdout
    res = json.loads((out / "tune.json").read_text())
    chosen = next(t for t in res["trials"] if t["name"] == res["chosen"])
    assert chosen["meets"] and chosen["drop"] <= 1.0 and chosen["backend"] == "onnxruntime"
    # the choice is the fastest trial within the budget, baseline included
    ok = [t for t in res["trials"] if t["meets"] and t["kind"] != "sensitivity"]
    assert chosen["latency_ms"] <= min(t["latency_ms"] for t in ok if t is not chosen) * 1.5
    assert (out / "model").is_dir() and (out / "tune.html").read_text().count("plotly") > 0
    rec = tomllib.loads((out / "recipe.toml").read_text())
    assert rec["model"]["ref"] == "mlp" and rec["target"]["variant"] == res["chosen"]
    assert all(s["key"] for s in rec["step"])
    dest = tmp_path / "rebuilt"
    code, stdout, err = cli("build", out / "recipe.toml", "-o", dest)
    assert code == 0, err
    assert "keys as in the recipe" in stdout
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in (out / "model").iterdir())
    # on an empty cache (a CI machine) every step is rebuilt, and its artifact has the recipe's bytes
    monkeypatch.setenv("DEEPSHIP_CACHE", str(tmp_path / "fresh-cache"))
    code, stdout, err = cli("build", out / "recipe.toml", "-o", tmp_path / "rebuilt-fresh")
    assert code == 0, err
    assert any((tmp_path / "fresh-cache").rglob("*.onnx"))
    onnx_steps = [s for s in rec["step"] if s.get("sha256")]
    assert onnx_steps, "the recipe records the artifacts' SHA-256"
    main = next(p for p in (tmp_path / "rebuilt-fresh").iterdir() if p.suffix == ".onnx")
    assert hashlib.sha256(main.read_bytes()).hexdigest() == rec["step"][-1]["sha256"]
    # other bytes under the same key: a non-deterministic writer is caught
    rec2 = tomllib.loads((out / "recipe.toml").read_text())
    rec2["step"][-1]["sha256"] = "f" * 64
    (tmp_path / "bytes.toml").write_text(tomli_w.dumps(rec2))
    code, _, err = cli("build", tmp_path / "bytes.toml", "-o", tmp_path / "never")
    assert code == 2 and "other bytes" in err and len(err.strip().splitlines()) == 1
    # a recipe whose key does not match what this machine builds fails in one line, and writes nothing
    rec["step"][-1]["key"] = "0" * 16
    bad = tmp_path / "bad.toml"
    bad.write_text(tomli_w.dumps(rec))
    code, _, err = cli("build", bad, "-o", tmp_path / "never")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "builds key" in err
    assert not (tmp_path / "never").exists()
    (tmp_path / "junk.toml").write_text("this is = not [toml")
    code, _, err = cli("build", tmp_path / "junk.toml")
    assert code == 2 and "is not TOML" in err


def test_recipe_reader_names_the_missing_field(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[model]\nref = "mlp"\n[[step]]\nname = "x"\nstage = "export"\n')
    with pytest.raises(StageError, match="step 1 has no method"):
        R.read_recipe(p)
    p.write_text('[target]\nvariant = "x"\n')
    with pytest.raises(StageError, match="no \\[model\\] ref"):
        R.read_recipe(p)
    with pytest.raises(StageError, match="does not exist"):
        R.read_recipe(Path(tmp_path / "nope.toml"))


def test_a_budget_no_variant_meets_says_so_in_one_line_and_exits_2(cli, tmp_path):
    # accuracy@5 is not a measure of the MLP: no variant can meet the bar
    code, stdout, err = cli("tune", "mlp", "--require", "accuracy@5>=2", "--backends", "onnxruntime", "--batch", "8",
                            "--out", tmp_path / "t")
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error")]
    assert len(lines) == 1 and "met the budget" in lines[0]
    assert not (tmp_path / "t" / "recipe.toml").exists() and (tmp_path / "t" / "tune.md").is_file()


def test_sensitivity_finds_the_planted_layer_of_a_real_model(tmp_path):
    """A real model (tests/fixtures/user_models.py:PlantedNet) with one layer that INT8 breaks: the
    sensitivity pass ranks it first, and the mixed search keeps exactly it in float."""
    import onnx
    import torch
    import user_models
    from onnx import numpy_helper

    net = user_models.make_planted()
    x = np.random.default_rng(0).random((240, 8)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(tmp_path / "d.npz", x=x, targets=y)
    ctx = api.load("user_models:make_planted", inputs=["x:float32[batch,8]"], data=str(tmp_path / "d.npz"))
    tuner = T.Tuner(ctx, T.Budget(max_drop=3.0), backends=("onnxruntime",), batch=8, min_time_s=0.02)
    tuner.prepare()
    onnx_v = api.export(ctx)
    m = onnx.load(str(onnx_v.path))
    big = {i.name for i in m.graph.initializer if np.abs(numpy_helper.to_array(i)).max() > 500}
    planted = next(n.name for n in m.graph.node if set(n.input) & big)
    base = tuner._try("uniform", "onnxruntime", "int8-dynamic",
                      lambda: ctx.build("int8-dynamic", "quantize", "int8-dynamic", {"per_channel": True}, onnx_v))
    assert not base.meets and base.drop > 20, base  # uniform INT8 breaks the model
    tuner.mixed(base)
    rows = tuner.sensitivity["int8-dynamic"]
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    ranked = sorted(rows, key=lambda r: -r["drop"])
    assert ranked[0]["layer"] == planted and ranked[0]["drop"] > 20 and ranked[1]["drop"] < 3.0
    assert ranked[0]["proxy"]["cosine"] < min(r["proxy"]["cosine"] for r in ranked[1:])  # the proxy agrees
    ok = [t for t in tuner.trials if t.kind == "mixed" and t.meets]
    assert ok and min(ok, key=lambda t: len(t.float_layers)).float_layers == [planted]
