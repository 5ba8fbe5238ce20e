"""Every bad input refused before work starts (issue 20): a table of bad inputs across every
subcommand, each answered with exit 2, exactly one stderr line that starts with ``error:``, no
traceback, and nothing new at the output path or in the cache; and a hypothesis fuzz of the option
parsing and of the .npz / ONNX / TOML readers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepship.errors import DeepshipError

NET = ["user_models:make_net", "--input", "x:float32[batch,8]"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad files the cases refer to (by name in ``{...}`` placeholders)."""
    import onnx
    import torch
    import user_models

    from deepship import api
    from deepship.models.train import save_weights

    d = tmp_path_factory.mktemp("bad")
    save_weights(user_models.make_net(), d / "net.safetensors")
    save_weights(torch.nn.Linear(3, 3), d / "other.safetensors")
    (d / "corrupt.safetensors").write_bytes(b"\x00not safetensors" * 4)
    rng = np.random.default_rng(0)
    x = rng.random((40, 8)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    np.savez(d / "data.npz", x=x, targets=y)
    np.savez(d / "nolabels.npz", x=x)
    bad = x.copy()
    bad[2, 3] = np.inf
    np.savez(d / "inf.npz", x=bad, targets=y)
    np.savez(d / "empty.npz", x=x[:0], targets=y[:0])
    np.savez(d / "wrongname.npz", z=x, targets=y)
    np.savez(d / "wrongshape.npz", x=x[:, :5], targets=y)
    np.savez(d / "strings.npz", x=np.full((40, 8), "a"), targets=y)
    np.savez(d / "short.npz", x=x, targets=y[:-3])
    (d / "text.npz").write_text("not an npz")
    (d / "zero.onnx").write_bytes(b"")
    (d / "corrupt.onnx").write_bytes(b"\x08garbage" * 8)
    ctx = api.load("user_models:make_net", inputs=["x:float32[batch,8]"], weights=str(d / "net.safetensors"))
    good = api.publish(api.export(ctx), d / "good.onnx")[0]
    m = onnx.load(str(good))
    (d / "ext").mkdir()
    onnx.save_model(m, str(d / "ext" / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (d / "ext" / "m.onnx.data").unlink()
    (d / "corrupt.pt2").write_bytes(b"PK\x03\x04 nope")
    (d / "afile").write_text("a file where a folder should be")
    (d / "notjson.json").write_text("{not json")
    rep = {"schema_version": 1, "tool": "deepship", "machine": {"cpu": "x"}, "settings": {"batches": [1]},
           "models": [{"model": "mlp", "metric": {"name": "accuracy", "higher_is_better": True, "scale": 100, "unit": "%"},
                       "variants": [{"variant": "fp32-onnx", "status": "ok", "metric": 0.9, "latency_ms": {}}]}]}
    (d / "report.json").write_text(json.dumps(rep))
    (d / "b_string.toml").write_text('[default]\nmax_drop = "1"\n')
    (d / "b_unknown.toml").write_text('[variants."mlp/int9"]\nmax_drop = 1.0\n')
    (d / "b_neg.toml").write_text("[default]\nlatency_tolerance = -0.5\n")
    (d / "b_key.toml").write_text("[default]\nmax_dorp = 1.0\n")
    (d / "b_bad.toml").write_text("[default\n")
    (d / "noise.wav").write_bytes(b"RIFF....WAVEnope")
    return d


F = "{d}"
CASES = [
    # (id, argv, words expected in the one error line)
    ("train-unknown", ["train", "resnet9000"], ["unknown model"]),
    ("export-unknown-model", ["export", "resnet9000", "-o", "{o}/x.onnx"], ["unknown model"]),
    ("export-no-input", ["export", "user_models:make_net", "-o", "{o}/x.onnx"], ["needs an input spec"]),
    ("export-bad-spec", ["export", "user_models:make_net", "--input", "x:float32[batch,8", "-o", "{o}/x.onnx"],
     ["cannot parse input spec", "x:float32[batch,3,32,32]"]),
    ("export-bad-dtype", ["export", "user_models:make_net", "--input", "x:float99[batch,8]"], ["unknown dtype"]),
    ("export-bad-dim", ["export", "user_models:make_net", "--input", "x:float32[batch,-3]"], ["bad dim"]),
    ("export-missing-weights", ["export", *NET, "--weights", F + "/nope.safetensors"], ["not found"]),
    ("export-corrupt-weights", ["export", *NET, "--weights", F + "/corrupt.safetensors"], ["cannot read weights"]),
    ("export-wrong-weights", ["export", *NET, "--weights", F + "/other.safetensors"], ["do not fit the model"]),
    ("export-wrong-shape", ["export", "user_models:make_net", "--input", "x:float32[batch,9]"],
     ["fails on its example inputs", "x[2, 9]"]),
    ("export-opset-low", ["export", *NET, "--opset", "3"], ["opset 3"]),
    ("export-opset-high", ["export", *NET, "--opset", "99"], ["opset 99"]),
    ("export-out-under-file", ["export", *NET, "-o", F + "/afile/sub/x.onnx"], ["is a file"]),
    ("export-no-module", ["export", "no_such_pkg.mod:make", "--input", "x:float32[batch,8]"], ["cannot import module"]),
    ("export-not-module", ["export", "user_models:not_a_module", "--input", "x:float32[batch,8]"], ["not a torch.nn.Module"]),
    ("export-missing-pt2", ["export", F + "/nope.pt2"], ["not found"]),
    ("export-corrupt-pt2", ["export", F + "/corrupt.pt2"], ["torch.export program"]),
    ("export-onnx-already", ["export", F + "/good.onnx", "-o", "{o}/x.onnx"], ["already ONNX"]),
    ("export-hf-missing", ["export", "hf:" + F + "/nohf"], ["not found"]),
    ("export-bad-name", ["export", *NET, "--name", "a b/c"], ["bad --name"]),
    ("quantize-unknown-method", ["quantize", "mlp", "--method", "int9", "-o", "{o}/q.onnx"], ["unknown quantize method"]),
    ("quantize-unknown-calibration", ["quantize", "mlp", "--method", "int8-static", "--calibration", "foo"],
     ["unknown calibration method"]),
    ("quantize-block-0", ["quantize", "mlp", "--method", "int4-weight-only", "--block-size", "0"], ["block size 0"]),
    ("quantize-block-48", ["quantize", "mlp", "--method", "int4-weight-only", "--block-size", "48"], ["block size 48"]),
    ("quantize-zero-byte-onnx", ["quantize", F + "/zero.onnx", "--method", "int8-dynamic", "-o", "{o}/q.onnx"],
     ["not a valid ONNX model"]),
    ("quantize-corrupt-onnx", ["quantize", F + "/corrupt.onnx", "--method", "int8-dynamic"], ["not a valid ONNX model"]),
    ("quantize-missing-onnx", ["quantize", F + "/nope.onnx", "--method", "int8-dynamic"], ["not found"]),
    ("quantize-missing-external", ["quantize", F + "/ext/m.onnx", "--method", "int8-dynamic"], ["external data file"]),
    ("quantize-data-missing", ["quantize", *NET, "--method", "int8-static", "--data", F + "/nope.npz"], ["not found"]),
    ("quantize-data-text", ["quantize", *NET, "--method", "int8-static", "--data", F + "/text.npz"], ["cannot read"]),
    ("quantize-data-inf", ["quantize", *NET, "--method", "int8-static", "--data", F + "/inf.npz"],
     ["NaN or Inf", "(2, 3)"]),
    ("quantize-data-noarray", ["quantize", *NET, "--method", "int8-static", "--data", F + "/wrongname.npz"],
     ["has no array 'x'"]),
    ("quantize-data-shape", ["quantize", *NET, "--method", "int8-static", "--data", F + "/wrongshape.npz"], ["axis 1"]),
    ("quantize-data-strings", ["quantize", *NET, "--method", "int8-static", "--data", F + "/strings.npz"], ["dtype"]),
    ("quantize-data-lengths", ["quantize", *NET, "--method", "int8-static", "--data", F + "/short.npz"],
     ["different sample counts"]),
    ("quantize-calib-empty", ["quantize", *NET, "--method", "int8-static", "--data", F + "/data.npz",
                              "--calibration-data", F + "/empty.npz"], ["holds no samples"]),
    ("quantize-train-unlabeled", ["quantize", *NET, "--method", "int8-static", "--data", F + "/data.npz",
                                  "--train-data", F + "/nolabels.npz"], ["has no targets"]),
    ("quantize-train-without-data", ["quantize", *NET, "--method", "int8-static", "--train-data", F + "/data.npz"],
     ["need --data"]),
    ("quantize-bf16-onnx", ["quantize", F + "/good.onnx", "--method", "bf16"], ["needs a torch model"]),
    ("engine-unknown-backend", ["engine", "mlp", "--backend", "foo", "-o", "{o}/e"], ["unknown engine backend"]),
    ("engine-bad-precision", ["engine", "mlp", "--precision", "int3"], ["int3"]),
    ("engine-bad-shapes", ["engine", "mlp", "--backend", "inductor", "--shapes", "batch=8/4/2"], ["shapes"]),
    ("engine-bad-batches", ["engine", "mlp", "--batches", "abc"], ["bad --batches"]),
    ("engine-zero-batches", ["engine", "mlp", "--batches", "0"], ["bad --batches"]),
    ("prune-sparsity-high", ["prune", "mlp", "--sparsity", "1.5", "-o", "{o}/p"], ["sparsity"]),
    ("prune-sparsity-text", ["prune", "mlp", "--sparsity", "abc"], ["bad --sparsity"]),
    ("prune-importance", ["prune", "mlp", "--importance", "l7"], ["importance"]),
    ("prune-onnx", ["prune", F + "/good.onnx"], ["ONNX file"]),
    ("prune-quantize-unknown", ["prune", "mlp", "--quantize", "int9"], ["unknown quantize method"]),
    ("prune-batches", ["prune", "mlp", "--batches", "-1"], ["bad --batches"]),
    ("distill-onnx", ["distill", F + "/good.onnx", "-o", "{o}/d"], ["ONNX file"]),
    ("distill-student-key", ["distill", "mlp", "--student", "c9=3"], ["unknown student key"]),
    ("distill-no-train-data", ["distill", *NET, "--weights", F + "/net.safetensors", "--data", F + "/data.npz"],
     ["--train-data"]),
    ("distill-temperature", ["distill", "mlp", "--temperature", "0"], ["temperature"]),
    ("report-unknown-model", ["report", "resnet9000", "--out", "{o}/r"], ["unknown model"]),
    ("report-methods", ["report", "mlp", "--methods", "int9", "--out", "{o}/r"], ["unknown quantize method"]),
    ("report-batches-text", ["report", "mlp", "--batches", "abc", "--out", "{o}/r"], ["bad --batches"]),
    ("report-batches-zero", ["report", "mlp", "--batches", "0", "--out", "{o}/r"], ["bad --batches"]),
    ("report-metric", ["report", *NET, "--data", F + "/data.npz", "--metric", "f1", "--out", "{o}/r"],
     ["unknown metric"]),
    ("report-engines", ["report", "mlp", "--engines", "foo", "--out", "{o}/r"], ["unknown engine backend"]),
    ("report-prune", ["report", "mlp", "--prune", "1.2", "--out", "{o}/r"], ["sparsity"]),
    ("report-two-models-data", ["report", "mlp", "cnn", "--data", F + "/data.npz", "--out", "{o}/r"],
     ["name exactly one"]),
    ("report-distill-onnx", ["report", F + "/good.onnx", "--distill", "--out", "{o}/r"], ["ONNX file"]),
    ("report-out-under-file", ["report", "mlp", "--out", F + "/afile/r"], ["is a file"]),
    ("check-missing", ["check", F + "/nope.json", "--baseline", F + "/report.json"], ["not found"]),
    ("check-not-json", ["check", F + "/notjson.json", "--baseline", F + "/report.json"], ["not valid JSON"]),
    ("check-budget-string", ["check", F + "/report.json", "--baseline", F + "/report.json", "--budgets",
                             F + "/b_string.toml"], ["not a number"]),
    ("check-budget-unknown-variant", ["check", F + "/report.json", "--baseline", F + "/report.json", "--budgets",
                                      F + "/b_unknown.toml"], ["mlp/int9"]),
    ("check-budget-negative", ["check", F + "/report.json", "--baseline", F + "/report.json", "--budgets",
                               F + "/b_neg.toml"], ["is negative"]),
    ("check-budget-key", ["check", F + "/report.json", "--baseline", F + "/report.json", "--budgets",
                          F + "/b_key.toml"], ["unknown budget key 'max_dorp'"]),
    ("check-budget-toml", ["check", F + "/report.json", "--baseline", F + "/report.json", "--budgets",
                           F + "/b_bad.toml"], ['[variants."model/variant"]']),
    ("check-budget-missing", ["check", F + "/report.json", "--baseline", F + "/report.json", "--budgets",
                              F + "/nope.toml"], ["not found"]),
    ("check-negative-flag", ["check", F + "/report.json", "--baseline", F + "/report.json", "--max-drop", "-1"],
     ["is negative"]),
    ("serve-port", ["serve", F + "/report.json", "--port", "99999"], ["--port 99999"]),
    ("serve-missing-report", ["serve", F + "/nope.json"], ["not found"]),
    ("serve-batch-size", ["serve", F + "/report.json", "--max-batch-size", "0"], ["must be positive"]),
    ("generate-tokens", ["generate", "gpt", "--prompt", "To be", "--max-new-tokens", "0"], ["max-new-tokens"]),
    ("generate-k", ["generate", "gpt", "--prompt", "To be", "--speculative", "--k", "0"], ["--k 0"]),
    ("generate-variant", ["generate", "gpt", "--prompt", "To be", "--variant", "int9"], ["unknown variant"]),
    ("generate-empty-prompt", ["generate", "gpt", "--prompt", ""], ["prompt is empty"]),
    ("generate-not-decoder", ["generate", "mlp", "--prompt", "hi"], ["not a GPT decoder"]),
    ("asr-missing-audio", ["asr", "transcribe", F + "/nope.wav"], ["not found"]),
    ("asr-not-audio", ["asr", "transcribe", F + "/noise.wav"], ["cannot read"]),
    ("asr-bundle-variant", ["asr", "bundle", "--variant", "int9", "--out", "{o}/b"], ["unknown variant"]),
]


def _tree(p: Path) -> set[str]:
    return {str(q.relative_to(p)) for q in p.rglob("*")} if p.exists() else set()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_leaves_nothing(case, files, cli, tmp_path, monkeypatch):
    name, argv, words = case
    cache = tmp_path / "cache"
    monkeypatch.setenv("DEEPSHIP_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "o"
    args = [a.replace("{d}", str(files)).replace("{o}", str(out_dir)) for a in argv]
    before_files = _tree(files)
    code, out, err = cli(*args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (name, code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), (name, err)
    assert "Traceback" not in out + err
    text = " ".join(err.split())
    for w in words:
        assert w in text, (name, w, text)
    assert _tree(cache) == set() or all(p.startswith(("speech", "weights", "gpt")) for p in _tree(cache)), \
        (name, sorted(_tree(cache))[:5])
    assert not out_dir.exists(), (name, sorted(_tree(out_dir)))
    assert _tree(files) == before_files, name


def test_the_table_covers_every_subcommand():
    assert len(CASES) >= 60
    assert {c[1][0] for c in CASES} >= {"train", "export", "quantize", "engine", "prune", "distill", "report", "check",
                                         "serve", "generate", "asr"}


# ---- fuzz: option parsing and the readers ----------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=40))
def test_fuzz_input_specs_and_option_values(text):
    from deepship.cli._common import batch_sizes
    from deepship.models.spec import parse_input_spec
    from deepship.pipeline.prune import parse_sparsities
    from deepship.runtimes.engines.tensorrt import parse_shapes

    for fn in (parse_input_spec, batch_sizes, parse_sparsities, parse_shapes):
        try:
            fn(text)
        except DeepshipError:
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300), st.sampled_from(["npz", "onnx", "toml"]))
def test_fuzz_readers_never_raise_anything_but_a_deepship_error(tmp_path_factory, blob, kind):
    from deepship.models.user import onnx_spec, factory_spec
    from deepship.models.userdata import read_npz
    from deepship.pipeline.check import Budget, load_budgets

    d = tmp_path_factory.mktemp("fz")
    p = d / f"f.{kind}"
    p.write_bytes(blob)
    try:
        if kind == "npz":
            read_npz(p, factory_spec("user_models:make_net", ["x:float32[batch,8]"]), "--data")
        elif kind == "onnx":
            onnx_spec(str(p))
        else:
            load_budgets(p, Budget())
    except DeepshipError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["x", "X", "inputs", "targets", "labels", "y", "z"]),
                       st.tuples(st.sampled_from(["float32", "float64", "int64", "int8", "bool", "U1"]),
                                 st.lists(st.integers(0, 5), min_size=0, max_size=3)), max_size=4))
def test_fuzz_npz_contents(tmp_path_factory, arrays):
    from deepship.models.user import factory_spec
    from deepship.models.userdata import read_npz

    d = tmp_path_factory.mktemp("fzn")
    np.savez(d / "a.npz", **{k: np.zeros(shape, dtype=dt) for k, (dt, shape) in arrays.items()})
    try:
        read_npz(d / "a.npz", factory_spec("user_models:make_net", ["x:float32[batch,8]"]), "--data")
    except DeepshipError:
        pass


@pytest.mark.parametrize("argv,words", [
    (["serve", "x.json", "--port", "abc"], ["Invalid value for '--port'", "see optimize serve --help"]),
    (["export", "mlp", "--bogus"], ["No such option: --bogus"]),
    (["report", "--batches"], ["requires an argument"]),
])
def test_usage_errors_are_one_line_too(argv, words, tmp_path):
    """Typer's own usage errors (wrong type, unknown option, missing value) through the real entry point."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "deepship.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert all(w in lines[0] for w in words), lines[0]
