"""The artifact cache key covers everything that changes an artifact (issue 13).

Property-based (hypothesis): changing any one of the model spec's inputs (name, dims, dtype, value
range), outputs, metric, source identity, the weights, a stage's method or parameters, the calibration
data or its sample count, or a library version changes the key; equal inputs give equal keys.
Regression tests: on a warm cache, new calibration data and a new ``--input`` spec give new artifacts.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepship.models.spec import METRICS, Dataset, ModelSpec, Split, TensorSpec
from deepship.pipeline.context import CALIBRATION_SAMPLES, hash_dataset
from deepship.pipeline.stages import get_stage
from deepship.pipeline.variants import baseline_key, variant_key

names = st.from_regex(r"[a-z][a-z0-9_]{0,7}", fullmatch=True)
dims = st.lists(st.one_of(st.integers(1, 64), st.sampled_from(["batch", "seq", "time"])), min_size=1, max_size=4)
dtypes = st.sampled_from(["float32", "float16", "int64", "int32"])
tensor_specs = st.builds(lambda n, d, t, lo: TensorSpec(n, tuple(d), t, lo, lo + 1.0), names, dims, dtypes,
                         st.sampled_from([0.0, -1.0, 0.5]))
specs = st.builds(
    lambda name, inputs, outs, metric, ident: ModelSpec(
        name=name, task="other", build=None, inputs=inputs, output_names=outs,
        metric=None if metric is None else METRICS[metric], source="factory", extra={"identity": ident}),
    names, st.lists(tensor_specs, min_size=1, max_size=3, unique_by=lambda t: t.name),
    st.lists(names, min_size=1, max_size=2, unique=True), st.one_of(st.none(), st.sampled_from(sorted(METRICS))),
    st.text("0123456789abcdef", min_size=16, max_size=16))


def _key(spec: ModelSpec, weights: str = "w") -> str:
    return baseline_key(spec.fingerprint(), weights)


def _mutations(spec: ModelSpec) -> list[tuple[str, ModelSpec]]:
    """One changed copy of ``spec`` per field that must reach the key."""
    t0 = spec.inputs[0]
    other_dims = tuple((d + 1) if isinstance(d, int) else ("dyn" if d != "dyn" else "batch") for d in t0.dims)
    other_metric = next(m for m in [None, *METRICS.values()] if m != spec.metric)
    return [
        ("input name", spec.replace(inputs=[dataclasses.replace(t0, name=t0.name + "x"), *spec.inputs[1:]])),
        ("input dims", spec.replace(inputs=[dataclasses.replace(t0, dims=other_dims), *spec.inputs[1:]])),
        ("input rank", spec.replace(inputs=[dataclasses.replace(t0, dims=t0.dims + (3,)), *spec.inputs[1:]])),
        ("input dtype", spec.replace(inputs=[dataclasses.replace(t0, dtype="float64" if t0.dtype != "float64"
                                                                 else "float32"), *spec.inputs[1:]])),
        ("input range", spec.replace(inputs=[dataclasses.replace(t0, high=t0.high + 1), *spec.inputs[1:]])),
        ("input added", spec.replace(inputs=[*spec.inputs, TensorSpec("extra_input", ("batch",))])),
        ("output names", spec.replace(output_names=[*spec.output_names, "zz_out"])),
        ("metric", spec.replace(metric=other_metric)),
        ("identity", spec.replace(extra={"identity": spec.extra["identity"][::-1] + "x"})),
        ("name", spec.replace(name=spec.name + "2")),
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_baseline_key_changes_with_every_spec_field(spec):
    k = _key(spec)
    assert _key(dataclasses.replace(spec)) == k  # equal specs, equal keys
    for what, changed in _mutations(spec):
        assert _key(changed) != k, what
    assert _key(spec, "w2") != k, "weights"


params = st.dictionaries(st.sampled_from(["calibration", "per_channel", "block_size", "sparsity", "opset"]),
                         st.one_of(st.integers(0, 512), st.booleans(), st.sampled_from(["minmax", "entropy"])),
                         max_size=4)


@settings(max_examples=80, deadline=None)
@given(parent=st.text("0123456789abcdef", min_size=16, max_size=16), stage=st.sampled_from(["quantize", "prune"]),
       method=st.sampled_from(["int8-static", "int8-dynamic", "structured"]), p=params,
       data=st.one_of(st.none(), st.tuples(st.text("0123456789abcdef", min_size=4, max_size=8), st.integers(1, 999))),
       torch_v=st.sampled_from(["2.13.0", "2.14.1"]))
def test_variant_key_changes_with_every_input(parent, stage, method, p, data, torch_v):
    versions = {"torch": torch_v, "onnx": "1.23", "onnxruntime": "1.32", "numpy": "2.0"}
    data_l = None if data is None else list(data)
    k = variant_key(parent, stage, method, p, data_l, versions)
    assert variant_key(parent, stage, method, dict(p), None if data is None else list(data), dict(versions)) == k
    assert variant_key(parent[::-1] + "0", stage, method, p, data_l, versions) != k
    assert variant_key(parent, stage + "x", method, p, data_l, versions) != k
    assert variant_key(parent, stage, method + "x", p, data_l, versions) != k
    assert variant_key(parent, stage, method, {**p, "samples": 7}, data_l, versions) != k
    assert variant_key(parent, stage, method, p, ["other-data", 1], versions) != k
    if data is not None:
        assert variant_key(parent, stage, method, p, [data[0], data[1] + 1], versions) != k  # sample count
        assert variant_key(parent, stage, method, p, [data[0] + "0", data[1]], versions) != k  # data hash
    assert variant_key(parent, stage, method, p, data_l, {**versions, "onnxruntime": "9.9"}) != k


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.integers(0, 2 ** 31 - 1))
def test_dataset_hash_sees_every_value(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 3)).astype(np.float32)
    y = rng.integers(0, 3, n)
    ds = Dataset(Split({"x": x}, y), Split({"x": x[:1]}, y[:1]))
    h = hash_dataset(ds)
    assert hash_dataset(Dataset(Split({"x": x.copy()}, y.copy()), Split({"x": x[:1].copy()}, y[:1].copy()))) == h
    x2 = x.copy()
    x2[rng.integers(n), rng.integers(3)] += 1.0
    assert hash_dataset(Dataset(Split({"x": x2}, y), Split({"x": x[:1]}, y[:1]))) != h
    assert hash_dataset(Dataset(Split({"x": x}, (y + 1) % 3), Split({"x": x[:1]}, y[:1]))) != h


def test_data_reading_stages_declare_it():
    for stage, method in [("quantize", "int8-static"), ("prune", "structured"), ("prune", "unstructured"),
                          ("distill", "kd"), ("engine", "tensorrt"), ("engine", "inductor")]:
        assert get_stage(stage, method).uses_data, (stage, method)
    for stage, method in [("quantize", "int8-dynamic"), ("quantize", "fp16"), ("export", "onnx")]:
        assert not get_stage(stage, method).uses_data, (stage, method)


def test_context_keys_follow_data_and_weights(tmp_path):
    """ModelContext: the baseline key follows the weights file's bytes; data stages follow the data."""
    import user_models

    from deepship import api
    from deepship.models.train import save_weights

    w = tmp_path / "w.safetensors"
    save_weights(user_models.make_net(), w)
    rng = np.random.default_rng(0)
    for i in (1, 2):
        np.savez(tmp_path / f"d{i}.npz", x=rng.random((20, 8)).astype(np.float32), targets=rng.integers(0, 3, 20))
    a = api.load("user_models:make_net", inputs=["x:float32[batch,8]"], weights=str(w), data=str(tmp_path / "d1.npz"))
    b = api.load("user_models:make_net", inputs=["x:float32[batch,8]"], weights=str(w), data=str(tmp_path / "d2.npz"))
    assert a.identity() == b.identity()  # the data does not change the FP32 model ...
    assert a.data_key() != b.data_key()  # ... but it changes every stage that reads it
    net = user_models.make_net()
    with __import__("torch").no_grad():
        net.fc1.bias += 1
    save_weights(net, w)
    c = api.load("user_models:make_net", inputs=["x:float32[batch,8]"], weights=str(w))
    assert c.identity() != a.identity()
    assert CALIBRATION_SAMPLES == 256


@pytest.fixture()
def byom(tmp_path, monkeypatch):
    """A user CNN package (28x28 MNIST-shaped input) in a fresh folder with its own cache."""
    import sys

    import torch

    (tmp_path / "byom_net.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),\n"
        "                         nn.Linear(4 * 14 * 14, 10))\n")
    # the CLI imports package.module:factory from the working folder; syspath_prepend is not used, as it
    # restores all of sys.path afterwards and drops entries that libraries imported meanwhile appended
    monkeypatch.chdir(tmp_path)
    if "" not in sys.path:
        sys.path.insert(0, "")
    monkeypatch.setenv("DEEPSHIP_CACHE", str(tmp_path / "cache"))
    sys.modules.pop("byom_net", None)
    import byom_net

    torch.manual_seed(0)
    torch.save(byom_net.build().state_dict(), tmp_path / "w.pth")
    x = np.random.default_rng(1).normal(3.0, 2.0, (64, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return tmp_path


def test_warm_cache_new_calibration_data_gives_new_artifact(cli, byom):
    """Regression: int8-static, then the same with --data, reused the first artifact byte for byte."""
    common = ["byom_net:build", "--input", "x:float32[batch,1,28,28]", "--weights", "w.pth", "--method", "int8-static"]
    code, out_a, err = cli("quantize", *common, "-o", "a.onnx")
    assert code == 0, err
    assert "random inputs" in out_a
    code, out_b, err = cli("quantize", *common, "--data", "calib.npz", "-o", "b.onnx")
    assert code == 0, err
    assert "random inputs" not in out_b and "samples of calib.npz" in " ".join(out_b.split())
    assert (byom / "a.onnx").read_bytes() != (byom / "b.onnx").read_bytes()
    # and the same command on an empty cache writes exactly what the warm cache gave
    import shutil

    shutil.rmtree(byom / "cache")
    code, _, err = cli("quantize", *common, "--data", "calib.npz", "-o", "c.onnx")
    assert code == 0, err
    assert (byom / "c.onnx").read_bytes() == (byom / "b.onnx").read_bytes()
    # a separate calibration file is calibration data too: another artifact again
    x2 = np.random.default_rng(2).normal(-1.0, 0.5, (32, 1, 28, 28)).astype(np.float32)
    np.savez(byom / "calib2.npz", inputs=x2)
    code, out_d, err = cli("quantize", *common, "--data", "calib.npz", "--calibration-data", "calib2.npz", "-o", "d.onnx")
    assert code == 0, err
    assert "32 samples of calib2.npz (--calibration-data)" in " ".join(out_d.split())
    assert (byom / "d.onnx").read_bytes() != (byom / "b.onnx").read_bytes()


def test_warm_cache_new_input_spec_gives_new_artifact(cli, byom):
    """Regression: a changed --input on a warm cache exited 0 and wrote the old 28x28 model."""
    import onnx

    code, _, err = cli("export", "byom_net:build", "--input", "x:float32[batch,1,28,28]", "--weights", "w.pth",
                       "-o", "a.onnx")
    assert code == 0, err
    code, out, err = cli("export", "byom_net:build", "--input", "x:float32[batch,1,32,32]", "--weights", "w.pth",
                         "-o", "b.onnx")
    assert code == 2 and not (byom / "b.onnx").exists()  # 32x32 does not fit the Linear layer
    code, _, err = cli("export", "byom_net:build", "--input", "inputs:float32[batch,1,28,28]", "--weights", "w.pth",
                       "-o", "c.onnx")
    assert code == 0, err
    assert [i.name for i in onnx.load(str(byom / "c.onnx")).graph.input] == ["inputs"]
