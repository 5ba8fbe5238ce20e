"""The default zoo's report as a Triton model repository, served back by deepship: every model answers.

Runs ``optimize deploy triton REPORT --out DIR`` (in-process), parses every ``config.pbtxt`` with
Triton's ``ModelConfig`` proto, starts deepship's server on the folder (``load_triton_repository``)
and sends each model one KServe v2 ``infer`` request through ``tritonclient.http``: inputs shaped
from the model's metadata (batch 1; a KV-cache decoder gets one token and empty caches; other
dynamic dims 4), float inputs uniform in [0, 1), integer inputs token ids below 8. Records per
model the backend, ``max_batch_size``, preferred batch sizes, the request's wall time (ms) and
whether every output came back finite.

Writes ``benchmarks/results/deploy_triton.json``. Run::

    .venv/bin/optimize report --out report          # or make report
    .venv/bin/python benchmarks/deploy_triton.py [--report report/report.json] [--out /tmp/model_repository]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

NP = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_,
      "UINT8": np.uint8, "INT8": np.int8, "FP64": np.float64}


def feeds_for(meta: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One request's inputs from a model's v2 metadata."""
    out = {}
    for t in meta["inputs"]:
        shape = []
        for i, d in enumerate(t["shape"]):
            if d != -1:
                shape.append(d)
            elif i == 0:
                shape.append(1)
            elif t["name"].startswith("past_key_values."):
                shape.append(0)  # an empty KV cache
            elif t["name"] == "input_ids":
                shape.append(1)
            else:
                shape.append(4)
        dt = NP[t["datatype"]]
        out[t["name"]] = (rng.integers(0, 8, shape).astype(dt) if np.issubdtype(dt, np.integer)
                          else rng.random(shape).astype(dt))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=str(ROOT / "report" / "report.json"))
    ap.add_argument("--out", default="/tmp/deepship-model-repository")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "deploy_triton.json"))
    args = ap.parse_args()

    import tritonclient.http as th
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from deepship.serving import InferenceServer, ServerConfig, start_in_thread
    from deepship.serving.triton_repo import load_triton_repository, write_triton_repository

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = write_triton_repository(args.report, out)
    deploy_s = time.perf_counter() - t0
    rows = []
    for m in res["models"]:
        cfg = text_format.Parse((out / m["name"] / "config.pbtxt").read_text(), mc.ModelConfig())
        assert cfg.name == m["name"]
    t0 = time.perf_counter()
    srv = InferenceServer(load_triton_repository(out), ServerConfig())
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    with start_in_thread(srv) as r:
        c = th.InferenceServerClient(r.url.removeprefix("http://"))
        for m in res["models"]:
            meta = c.get_model_metadata(m["name"])
            feeds = feeds_for(meta, rng)
            inputs = []
            for t in meta["inputs"]:
                i = th.InferInput(t["name"], list(feeds[t["name"]].shape), t["datatype"])
                i.set_data_from_numpy(feeds[t["name"]])
                inputs.append(i)
            t1 = time.perf_counter()
            try:
                got = c.infer(m["name"], inputs)
                outs = {o["name"]: got.as_numpy(o["name"]) for o in meta["outputs"]}
                ok = all(a is not None and np.isfinite(a.astype(np.float64)).all() for a in outs.values())
                err = ""
            except Exception as e:  # recorded, not hidden: the run fails below
                ok, err = False, f"{type(e).__name__}: {str(e)[:200]}"
            rows.append({**m, "answered": ok, "request_ms": round((time.perf_counter() - t1) * 1e3, 3),
                         "inputs": {k: list(v.shape) for k, v in feeds.items()}, "error": err})
            print(f"{m['name']:48s} {'ok' if ok else 'FAILED ' + err}  max_batch_size {m['max_batch_size']}  "
                  f"preferred {m['preferred_batch_size']}")
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "report": str(Path(args.report).resolve()),
               "deploy_s": round(deploy_s, 2), "serve_load_s": round(load_s, 2), "models": len(rows),
               "answered": sum(r["answered"] for r in rows), "skipped": res["skipped"], "rows": rows}
    Path(args.results).write_text(json.dumps(summary, indent=2))
    print(f"{summary['answered']}/{len(rows)} models answered; deploy {deploy_s:.1f} s, load {load_s:.1f} s; "
          f"wrote {args.results}")
    if summary["answered"] != len(rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
