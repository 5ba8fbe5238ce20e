"""Bring your own model (factory + weights, .pt2, .onnx, labeled .npz) and the CLI's bad-input contract:
one-line error, exit 2, no traceback, no partial file."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepship import api
from deepship.errors import DataError, InputSpecError, UnknownModelError, WeightsError
from deepship.models.train import save_weights


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    import user_models

    d = tmp_path_factory.mktemp("user")
    net = user_models.make_net()
    save_weights(net, d / "net.safetensors")
    torch.save(net.state_dict(), d / "net.pt")
    x = np.random.default_rng(0).random((40, 8)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy().astype(np.int64)
    np.savez(d / "data.npz", x=x, targets=y)
    ep = torch.export.export(net.eval(), (torch.from_numpy(x[:2]),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    torch.export.save(ep, str(d / "net.pt2"))
    return d


def test_factory_with_weights_and_labeled_data_reports_metric(user_files):
    ctx = api.load("user_models:make_net", inputs=["x:float32[batch,8]"], weights=str(user_files / "net.safetensors"),
                   data=str(user_files / "data.npz"))
    assert ctx.spec.metric.name == "accuracy"
    from deepship.pipeline.report import run_report

    rep = run_report([ctx.spec], out_dir=user_files / "rep", methods=["int8-dynamic"], batches=(1,),
                     min_time_s=0.01, engine=False, show_progress=False)
    rows = {r["variant"]: r for r in rep["models"][0]["variants"]}
    assert rows["fp32-torch"]["metric"] == pytest.approx(1.0)  # labels are the model's own predictions
    assert rows["int8-dynamic"]["status"] == "ok" and rows["int8-dynamic"]["metric"] >= 0.9
    assert rows["fp32-onnx"]["info"]["parity"]["ok"]


def test_factory_without_data_reports_drift(user_files):
    ctx = api.load("user_models:make_net", inputs=["x:float32[batch,8]"], weights=str(user_files / "net.pt"))
    from deepship.pipeline.report import run_report

    rep = run_report([ctx.spec], out_dir=user_files / "rep2", methods=["int8-dynamic"], batches=(1,),
                     min_time_s=0.01, engine=False, show_progress=False)
    row = {r["variant"]: r for r in rep["models"][0]["variants"]}["int8-dynamic"]
    assert row["metric"] is None
    assert set(row["drift"]) >= {"max_abs", "max_rel", "top1_agreement"}


def test_pt2_and_onnx_files(user_files):
    ctx = api.load(str(user_files / "net.pt2"))
    assert ctx.spec.inputs[0].dims == ("batch", 8)
    v = api.export(ctx)
    onnx_path = user_files / "net.onnx"
    api.publish(v, onnx_path)
    octx = api.load(str(onnx_path))
    assert octx.baseline().format == "onnx" and octx.spec.inputs[0].dims == ("batch", 8)
    q = api.quantize(octx, "int8-dynamic")
    assert q.info["nodes"]["quantized"]
    with pytest.raises(Exception, match="needs a torch model"):
        api.quantize(octx, "bf16")


def test_loader_errors(user_files, tmp_path):
    with pytest.raises(UnknownModelError, match="unknown model 'resnet9000'"):
        api.load("resnet9000")
    with pytest.raises(UnknownModelError, match="cannot import module"):
        api.load("no_such_pkg.mod:make", inputs=["x:float32[batch,8]"])
    with pytest.raises(InputSpecError, match="needs an input spec"):
        api.load("user_models:make_net")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read weights"):
        api.load("user_models:make_net", inputs=["x:float32[batch,8]"], weights=str(bad)).module()
    other = tmp_path / "other.safetensors"
    save_weights(torch.nn.Linear(3, 3), other)
    with pytest.raises(WeightsError, match="do not fit the model"):
        api.load("user_models:make_net", inputs=["x:float32[batch,8]"], weights=str(other)).module()
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 9), np.float32), targets=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="axis 1"):
        api.load("user_models:make_net", inputs=["x:float32[batch,8]"], data=str(tmp_path / "wrong.npz"))


def _assert_one_line_error(code, out, err, *words):
    assert code == 2, (code, out, err)
    text = (out + err).strip()
    assert "Traceback" not in text
    assert len(text.splitlines()) <= 3  # rich may wrap one long line
    assert text.startswith("error:")
    for w in words:
        assert w in " ".join(text.split()), text


def test_cli_bad_inputs(cli, tmp_path, user_files):
    out = tmp_path / "o"
    _assert_one_line_error(*cli("export", "resnet9000", "-o", out / "x.onnx"), "unknown model")
    _assert_one_line_error(*cli("export", "user_models:make_net", "--input", "x:float32[batch,8]",
                                "--weights", tmp_path / "missing.safetensors", "-o", out / "x.onnx"), "not found")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage" * 10)
    _assert_one_line_error(*cli("quantize", corrupt, "--method", "int8-dynamic", "-o", out / "q.onnx"),
                           "not a valid ONNX model")
    # an ONNX model whose external data file is missing
    import onnx

    m = onnx.load(str(Path(api.export(api.load(str(user_files / "net.pt2"))).path)))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(m, str(ext / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    (ext / "m.onnx.data").unlink()
    _assert_one_line_error(*cli("quantize", ext / "m.onnx", "--method", "int8-dynamic", "-o", out / "q.onnx"),
                           "external data file")
    _assert_one_line_error(*cli("quantize", "mlp", "--method", "int3", "-o", out / "q.onnx"), "unknown quantize method")
    _assert_one_line_error(*cli("export", "user_models:make_net", "--input", "x:float32[batch,8", "-o", out / "x.onnx"),
                           "cannot parse input spec", "x:float32[batch,3,32,32]")  # brackets printed as written
    _assert_one_line_error(*cli("report", "user_models:make_net", "--input", "x:float32[batch,8]",
                                "--data", tmp_path / "nope.npz", "--out", out / "r"), "data file")
    # nothing half-written anywhere in the output folder
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert leftovers == []


def test_cli_unwritable_output(cli, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced, use a file as parent
            blocker = tmp_path / "file"
            blocker.write_text("x")
            target = blocker / "sub" / "m.onnx"
        else:
            target = ro / "m.onnx"
        code, o, e = cli("export", "mlp", "-o", target)
        _assert_one_line_error(code, o, e, "output folder")
    finally:
        ro.chmod(0o700)


def test_session_rejects_wrong_shape_and_dtype(zoo_ctx):
    ctx = zoo_ctx("cnn")
    s = ctx.session(api.export(ctx))
    with pytest.raises(InputSpecError, match="expects"):
        s.run({"x": np.zeros((2, 1, 9, 9), np.float32)})
    with pytest.raises(InputSpecError, match="expects"):
        s.run({"x": np.zeros((2, 1, 8, 8), np.float64)})
    with pytest.raises(InputSpecError, match="missing input 'x'"):
        s.run({"y": np.zeros((2, 1, 8, 8), np.float32)})


def test_cli_export_and_quantize_print_parity_and_nodes(cli, tmp_path):
    code, out, err = cli("export", "cnn", "-o", tmp_path / "cnn.onnx")
    assert code == 0, err
    assert "parity at" in out and "max abs" in out and "axis 0=batch" in out
    assert (tmp_path / "cnn.onnx").is_file()
    code, out, err = cli("quantize", "cnn", "--method", "int8-static", "--calibration", "percentile",
                         "-o", tmp_path / "q.onnx")
    assert code == 0, err
    assert "quantized Conv x2, Gemm x2" in out and "percentile" in out


def test_engine_prints_parity_and_latency_and_cache_commands(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSHIP_CACHE", str(tmp_path / "cache"))
    code, out, err = cli("engine", "user_models:make_net", "--input", "x:float32[batch,8]", "--backend", "inductor",
                         "--batches", "1,4", "--name", "tiny", "-o", tmp_path / "eng")
    assert code == 0, err
    text = " ".join(out.split())
    assert "parity against FP32 PyTorch on 64" in text and "p50 at batch 1:" in text and "p50 at batch 4:" in text
    import os

    # a temporary folder left by a killed build (its pid is gone) is swept by `cache ls`
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    stale = tmp_path / "cache" / "artifacts" / "tiny" / f".tmp-x-{pid}-abcd1234"
    stale.mkdir(parents=True)
    code, out, err = cli("cache", "ls")
    assert code == 0 and "tiny" in out and "inductor-engine" in out and not stale.exists()
    assert "removed 1 stale" in err
    code, out, err = cli("cache", "ls", "--json")
    entries = json.loads(out)["entries"]
    assert {e["variant"] for e in entries} >= {"fp32-torch", "inductor-engine"} and all(e["valid"] for e in entries)
    code, out, err = cli("cache", "clear", "tiny")
    assert code == 0 and "removed" in out and not (tmp_path / "cache" / "artifacts" / "tiny").exists()
