"""The three checklists of docs/architecture.md, followed once each from outside the package (a toy
model family, a toy stage, a toy engine backend), and the shape rules: one folder per family, no
module over 550 lines, and the import-linter contracts."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn

from deepship import api
from deepship.models import zoo
from deepship.models.spec import ACCURACY, Dataset, ModelSpec, Split, TensorSpec
from deepship.models.train import train_classifier
from deepship.pipeline import adapters, stages
from deepship.pipeline.adapters import ArchAdapter, register_adapter
from deepship.pipeline.engines import register_engine
from deepship.pipeline.report import run_report
from deepship.pipeline.stages import check_chain, register_stage
from deepship.runtimes import engines
from deepship.runtimes.engines import BuildSource
from deepship.runtimes.session import OrtSession

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "deepship"


@pytest.fixture()
def registries(monkeypatch):
    """Every registry the checklists write to, restored after the test."""
    monkeypatch.setattr(zoo, "_EXTRA", dict(zoo._EXTRA))
    monkeypatch.setattr(adapters, "_ADAPTERS", dict(adapters._ADAPTERS))
    stages.get_stage("export", "onnx")  # built-ins first, so the copy holds them
    monkeypatch.setattr(stages, "_STAGES", dict(stages._STAGES))
    monkeypatch.setattr(engines, "_BACKENDS", dict(engines._BACKENDS))


# ---- checklist 1: add a model ---------------------------------------------------------------------

class ToyNet(nn.Module):
    """Input float32 (batch, 4); logits float32 (batch, 2)."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.net(x)


def toy_data() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return Dataset(Split({"x": x[:150]}, y[:150]), Split({"x": x[150:]}, y[150:]), source="toy gaussian blobs")


def toy_spec() -> ModelSpec:
    return ModelSpec(name="toy", task="classification", build=lambda arch=None: ToyNet(**(arch or {})), family="toy",
                     inputs=[TensorSpec("x", ("batch", 4))], output_names=["logits"], metric=ACCURACY, data=toy_data,
                     recipe={"epochs": 20, "lr": 1e-2, "batch_size": 32, "seed": 0}, train=train_classifier,
                     description="toy classifier")


def test_add_a_model(registries, tmp_path):
    """A family registered from outside: a spec factory in the zoo, an adapter with its report rows and
    an extra measure; `optimize report toy` then builds, evaluates and measures it."""
    zoo.register_model("toy", toy_spec)
    register_adapter(ArchAdapter("toy", plan=lambda spec, default: [e for e in default if e[0] in ("fp32-onnx", "int8-dynamic")],
                                 measure=lambda ctx, v, sess: {"toy note": v.format}))
    assert "toy" in zoo.ZOO and api.load("toy").spec.family == "toy"
    rep = api.report(["toy"], out_dir=tmp_path, batches=(1,), min_time_s=0.01, show_progress=False)
    rows = {r["variant"]: r for r in rep["models"][0]["variants"]}
    assert list(rows) == ["fp32-torch", "fp32-onnx", "int8-dynamic"]
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["fp32-torch"]["metric"] > 0.9  # the seeded recipe ran (no committed weights for a toy)
    assert rows["int8-dynamic"]["extra"] == {"toy note": "onnx"}


# ---- checklist 2: add a stage ---------------------------------------------------------------------

def test_add_a_stage(registries, tmp_path):
    """An onnx -> onnx stage registered from outside: the chain check knows it, the cache builds it once."""
    calls = []

    @register_stage("optimize", "toy-copy", "onnx", "onnx")
    def toy_copy(ctx, parent, params, out):
        """Copy the parent graph (a stand-in for a graph pass)."""
        calls.append(parent.name)
        shutil.copyfile(parent.path, out / "model.onnx")
        return ["model.onnx"], {"note": params.get("note", "")}

    assert check_chain("torch", [("export", "onnx"), ("optimize", "toy-copy")]) == "onnx"
    with pytest.raises(Exception, match="consumes a onnx model"):
        check_chain("torch", [("optimize", "toy-copy")])
    ctx = api.load("user_models:make_net", inputs=["x:float32[batch,8]"])
    v = ctx.build("copied", "optimize", "toy-copy", {"note": "a"}, api.export(ctx))
    again = api.load("user_models:make_net", inputs=["x:float32[batch,8]"])
    v2 = again.build("copied", "optimize", "toy-copy", {"note": "a"}, api.export(again))
    assert calls == ["fp32-onnx"] and v2.key == v.key  # the second build came from the cache
    x = np.ones((3, 8), np.float32)
    assert np.allclose(ctx.session(v).run({"x": x})["output"], ctx.session(ctx.get("fp32-onnx")).run({"x": x})["output"])


# ---- checklist 3: add an engine backend -------------------------------------------------------------

class ToyBackend:
    """An 'engine' that is the ONNX graph itself, run by ONNX Runtime with one thread."""

    name = "toy"
    consumes = "onnx"
    precisions = ("fp32",)

    def available(self):
        return True, ""

    def build(self, source: BuildSource, out_dir: Path, precision: str, params: dict):
        shutil.copyfile(source.path, out_dir / "model.toy.onnx")
        return ["model.toy.onnx"], {"provider": "toy on CPUExecutionProvider", "providers": ["toy"]}

    def session(self, variant, threads=None):
        return OrtSession(variant.path, threads=1)


def test_add_an_engine_backend(registries, tmp_path):
    register_engine(ToyBackend())
    ctx = api.load("user_models:make_net", inputs=["x:float32[batch,8]"])
    v = api.engine(ctx, "toy")
    assert v.format == "engine:toy" and v.parent == "fp32-onnx" and v.info["backend"] == "toy"
    out = ctx.session(v).run({"x": np.ones((2, 8), np.float32)})["output"]
    assert out.shape == (2, 3)
    rep = run_report([ctx.spec], out_dir=tmp_path, methods=[], batches=(1,), min_time_s=0.01, show_progress=False,
                     plan=[("toy-engine", "engine", "toy", {"precision": "fp32"}, "fp32-onnx"),
                           ("fp32-onnx", "export", "onnx", {}, "fp32-torch")][::-1])
    rows = {r["variant"]: r for r in rep["models"][0]["variants"]}
    assert rows["toy-engine"]["status"] == "ok" and rows["toy-engine"]["format"] == "engine:toy"


# ---- the shape rules --------------------------------------------------------------------------------

def test_each_family_is_one_folder_and_modules_stay_small():
    for family in set(zoo.FAMILIES.values()):
        d = PKG / "models" / family
        trained_here = any(zoo.ZOO[n]().recipe is not None for n, f in zoo.FAMILIES.items() if f == family)
        want = {"__init__.py", "model.py", "data.py"} | ({"train.py"} if trained_here else set())  # bert: pretrained
        assert want <= {p.name for p in d.iterdir()}, family
    sizes = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert max(sizes.values()) <= 550, max(sizes.items(), key=lambda kv: kv[1])


def test_import_contracts_hold():
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed in this environment (pip install -e '.[test]')")
    p = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    assert "broken" in p.stdout and " 0 broken" in p.stdout
