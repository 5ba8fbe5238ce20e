"""``optimize deploy triton``: every config.pbtxt parses with Triton's own ModelConfig proto, versions
are numbered and kept, the KServe manifest is a valid InferenceService, and deepship's server serves
the very folder and answers a KServe v2 request for each of its models (issue 19)."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

th = pytest.importorskip("tritonclient.http", reason="tritonclient is missing (pip install -e '.[test]')")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is missing (pip install -e '.[test]')")

import onnxruntime as ort  # noqa: E402
import yaml  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from deepship.errors import ArtifactError  # noqa: E402
from deepship.models import resolve  # noqa: E402
from deepship.pipeline.report import run_report  # noqa: E402
from deepship.serving import InferenceServer, ServerConfig, start_in_thread  # noqa: E402
from deepship.serving.triton_repo import (DeployError, load_triton_repository, preferred_batch_sizes,  # noqa: E402
                                          write_triton_repository)

NP_OF = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep")
    specs = [resolve("mlp").replace(family=""), resolve("lstm").replace(family="")]
    run_report(specs, out_dir=out, batches=(1, 8), min_time_s=0.02, methods=["int8-dynamic", "int8-static", "fp16"],
               engines=["onnxruntime"], show_progress=False, threads=1)
    return out / "report.json"


@pytest.fixture(scope="module")
def repo(report, tmp_path_factory):
    out = tmp_path_factory.mktemp("mr") / "model_repository"
    res = write_triton_repository(report, out, kserve_name="digits", storage_uri="s3://bucket/mr")
    return out, res


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_every_config_parses_with_tritons_model_config(report, repo):
    out, res = repo
    rep = json.loads(report.read_text())
    rows = {f"{m['model']}-{v['variant']}": v for m in rep["models"] for v in m["variants"]
            if v["status"] == "ok" and v["format"] in ("onnx", "engine:onnxruntime")}
    assert {m["name"] for m in res["models"]} == set(rows) and len(rows) == 10
    assert any("fp32-torch" in s and "torch" in s for s in res["skipped"])
    for name, row in rows.items():
        cfg = text_format.Parse((out / name / "config.pbtxt").read_text(), mc.ModelConfig())  # strict: unknown fields fail
        assert cfg.name == name and cfg.backend == "onnxruntime" and cfg.platform == "onnxruntime_onnx"
        assert cfg.max_batch_size == 8  # the largest batch the report measured
        assert set(cfg.dynamic_batching.preferred_batch_size) <= {8}
        assert cfg.dynamic_batching.max_queue_delay_microseconds >= 1
        assert cfg.instance_group[0].count == 1 and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert cfg.parameters["intra_op_thread_count"].string_value == "1"  # as the report measured
        model_file = out / name / "1" / "model.onnx"
        assert _sha(model_file) == hashlib.sha256(open(row["artifact"], "rb").read()).hexdigest()
        sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        for decl, actual in ((cfg.input, sess.get_inputs()), (cfg.output, sess.get_outputs())):
            assert [i.name for i in decl] == [a.name for a in actual]
            for i, a in zip(decl, actual):
                assert list(i.dims) == [d if isinstance(d, int) else -1 for d in a.shape[1:]]
                assert mc.DataType.Name(i.data_type) == {"tensor(float)": "TYPE_FP32"}[a.type]
        prov = json.loads((out / name / "deepship.json").read_text())
        assert prov["versions"]["1"]["key"] == row["key"] and prov["variant"] == row["variant"]
    isvc = yaml.safe_load((out / "inference-service.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "digits"
    pred = isvc["spec"]["predictor"]["model"]
    assert pred["modelFormat"]["name"] == "triton" and pred["protocolVersion"] == "v2"
    assert pred["storageUri"] == "s3://bucket/mr"


def test_deepship_serves_the_repository_and_answers_each_model(repo):
    out, res = repo
    srv = InferenceServer(load_triton_repository(out), ServerConfig())
    with start_in_thread(srv) as r:
        c = th.InferenceServerClient(r.url.removeprefix("http://"))
        assert sorted(m["name"] for m in c.get_model_repository_index()) == sorted(m["name"] for m in res["models"])
        rng = np.random.default_rng(0)
        for m in res["models"]:
            meta = c.get_model_metadata(m["name"])
            assert meta["versions"] == ["1"]
            assert c.get_model_config(m["name"])["max_batch_size"] == 8
            feeds, inputs = {}, []
            for t in meta["inputs"]:
                shape = [3 if i == 0 else (5 if d == -1 else d) for i, d in enumerate(t["shape"])]
                a = rng.random(shape).astype(np.float32)
                feeds[t["name"]] = a
                inp = th.InferInput(t["name"], shape, t["datatype"])
                inp.set_data_from_numpy(a)
                inputs.append(inp)
            got = c.infer(m["name"], inputs, model_version="1")
            sess = ort.InferenceSession(str(out / m["name"] / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
            ref = sess.run(None, feeds)
            for o, want in zip(meta["outputs"], ref):
                # int8 kernels differ with ORT's graph optimization level; FP32 and FP16 match closely
                tol = 2e-2 if "int8" in m["name"] else 1e-3
                np.testing.assert_allclose(got.as_numpy(o["name"]), want, rtol=tol, atol=tol, err_msg=m["name"])


def test_redeploy_keeps_versions_and_adds_one_for_a_changed_artifact(report, tmp_path):
    out = tmp_path / "mr"
    first = write_triton_repository(report, out, variants=["int8-static"], models=["mlp"])
    assert [(m["name"], m["version"], m["new"]) for m in first["models"]] == [("mlp-int8-static", 1, True)]
    again = write_triton_repository(report, out, variants=["int8-static"], models=["mlp"])
    assert [(m["version"], m["new"]) for m in again["models"]] == [(1, False)]
    # a new build of the variant (here: the int8-dynamic file under the int8-static row) becomes version 2
    rep = json.loads(report.read_text())
    mlp = next(m for m in rep["models"] if m["model"] == "mlp")
    rows = {v["variant"]: v for v in mlp["variants"]}
    rows["int8-static"]["artifact"] = rows["int8-dynamic"]["artifact"]
    changed = tmp_path / "report.json"
    changed.write_text(json.dumps(rep))
    third = write_triton_repository(changed, out, variants=["int8-static"], models=["mlp"])
    assert [(m["version"], m["new"]) for m in third["models"]] == [(2, True)]
    mdir = out / "mlp-int8-static"
    assert sorted(p.name for p in mdir.iterdir()) == ["1", "2", "config.pbtxt", "deepship.json"]
    assert set(json.loads((mdir / "deepship.json").read_text())["versions"]) == {"1", "2"}
    served = load_triton_repository(out)
    assert served.get("mlp-int8-static").source["version"] == "2"
    assert not list(out.rglob(".tmp-*"))


def test_a_config_that_disagrees_with_its_model_refuses_to_serve(repo, tmp_path):
    src, _ = repo
    out = tmp_path / "mr"
    shutil.copytree(src / "mlp-fp32-onnx", out / "mlp-fp32-onnx")
    cfg_p = out / "mlp-fp32-onnx" / "config.pbtxt"
    good = cfg_p.read_text()
    cfg_p.write_text(good.replace("dims: 64", "dims: 65"))
    with pytest.raises(ArtifactError, match=r"config.pbtxt: input 'x' is .*65.* in the config but .*64"):
        load_triton_repository(out)
    cfg_p.write_text(good + "\nno_such_field: 1\n")
    with pytest.raises(ArtifactError, match="not a valid Triton model configuration"):
        load_triton_repository(out)
    cfg_p.write_text(good.replace('name: "mlp-fp32-onnx"', 'name: "other"'))
    with pytest.raises(ArtifactError, match="Triton needs them equal"):
        load_triton_repository(out)


def test_bad_deploy_inputs_fail_before_writing(report, tmp_path, cli):
    f = tmp_path / "file"
    f.write_text("x")
    for args, words in [
            (["--out", str(f)], "is a file"),
            (["--out", str(tmp_path / "a"), "--instances", "0"], "--instances 0 must be at least 1"),
            (["--out", str(tmp_path / "b"), "--variant", "fp32-torch"], "nothing to deploy"),
            (["--out", str(tmp_path / "c"), "--variant", "nope"], "variant 'nope' is not in"),
            (["--out", str(tmp_path / "d"), "--kserve-name", "Bad_Name"], "is not a Kubernetes name")]:
        code, stdout, stderr = cli("deploy", "triton", str(report), *args)
        assert code == 2, (args, stdout, stderr)
        assert words in stderr and stderr.count("\n") == 1, (args, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    code, _, stderr = cli("deploy", "triton", str(report), "--out", str(tmp_path / "foreign"))
    assert code == 2 and "is not a model repository (it holds notes.txt)" in stderr


def test_cli_json_summary(report, tmp_path, cli):
    code, stdout, _ = cli("deploy", "triton", str(report), "--out", str(tmp_path / "mr"), "--model", "lstm",
                          "--variant", "fp16", "--instances", "2", "--json")
    assert code == 0, stdout
    res = json.loads(stdout)
    assert [m["name"] for m in res["models"]] == ["lstm-fp16"]
    cfg = text_format.Parse((tmp_path / "mr" / "lstm-fp16" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.instance_group[0].count == 2


def test_preferred_batch_sizes_follow_measured_throughput():
    lat = {"1": {"throughput": 100.0}, "8": {"throughput": 700.0}, "32": {"throughput": 720.0},
           "64": {"throughput": 1000.0}}
    assert preferred_batch_sizes(lat, 64) == [8, 64]  # 32 gains < 10 % over 8
    assert preferred_batch_sizes(lat, 16) == [8]
    assert preferred_batch_sizes({"1": {"throughput": 5.0}}, 8) == []


def test_deploy_error_is_a_user_error():
    from deepship.errors import DeepshipError

    assert issubclass(DeployError, DeepshipError)
