"""Issue 16's bars: ``optimize tune`` on MiniLM, the CNN and the GPT, against the peers in one run.

1. **MiniLM (``bert``) at batch 32, sequence 128** (real sentences padded to 128): the tuner's choice
   under the budget mean cosine >= 0.995 and recall@1 >= 0.95, timed in interleaved rounds against
   PyTorch eager FP32 (the baseline), Optimum's dynamic INT8 (``ORTQuantizer`` with
   ``AutoQuantizationConfig.avx512_vnni(is_static=False)`` on the same ONNX export, run by ONNX Runtime)
   and OpenVINO FP32 (``convert_model`` + ``compile_model`` with ``INFERENCE_PRECISION_HINT=f32``);
   OpenVINO with its default configuration (which picks BF16 on CPUs with AMX) is listed too. Every
   contestant's cosine and recall@1 against FP32 on the 2,500 held-out sentences.
2. **MiniLM on the corpus's real lengths**: embedding the 2,000-line corpus, wall time, the tuned variant
   with length-sorted dynamic padding (:func:`deepship.pipeline.arch.hf.embed`, batches of 32) against
   sentence-transformers' ``SentenceTransformer.encode(batch_size=32)`` in FP32 on the same threads.
3. **MiniLM without BF16** (``precisions=("fp32", "int8")``): what the per-layer INT8 search finds.
4. **CNN** (latency, max drop 0.5 accuracy points) and **GPT** (size, perplexity within +1%): the tuned
   variant against the best uniform-precision variant within the same budget (from the same search).

Peers: ``pip install -e '.[bench,openvino]'`` (sentence-transformers; Optimum comes with the exporter).
Run: ``.venv/bin/python benchmarks/tune.py [--rounds 5] [--skip cnn,gpt]`` ->
``benchmarks/results/tune.json``, ``tune.md`` and each model's ``tune-<model>/`` (tune.json, tune.md,
recipe.toml). The machine's load average is recorded at the start and the end.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
BATCH, SEQ = 32, 128


class _Run:
    """A minimal deepship-Session-like wrapper: ``run(feeds) -> {"sentence_embedding": (n, 384)}``."""

    def __init__(self, fn, name):
        self.fn, self.name = fn, name
        self.output_names = ["sentence_embedding"]

    def run(self, feeds):
        return {"sentence_embedding": np.asarray(self.fn(feeds), np.float32)}


def tune_model(model: str, budget, out: Path, **kw) -> dict:
    from deepship import api
    from deepship.pipeline import recipe as R
    from deepship.pipeline import tune as T

    ctx = api.load(model)
    res = T.Tuner(ctx, budget, progress=lambda s: print(s, flush=True), **kw).run()
    R.write_outputs(res, out, {"ref": model})
    return ctx, res


def best_uniform(res: dict) -> dict | None:
    key = "latency_ms" if res["objective"] == "latency" else "size_bytes"
    ok = [t for t in res["trials"] if t["meets"] and t["kind"] in ("uniform", "baseline") and not t["error"]]
    return min(ok, key=lambda t: t[key]) if ok else None


def minilm(a) -> dict:
    import onnxruntime as ort
    import openvino as ov
    import torch
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from sentence_transformers import SentenceTransformer

    from deepship.models import hf
    from deepship.pipeline import tune as T
    from deepship.pipeline.arch import hf as AH

    torch.set_num_threads(a.threads)
    budget = T.Budget(max_drop=0.005, require={"recall@1": (">=", 0.95)})
    ctx, res = tune_model("bert", budget, RESULTS / "tune-bert", batch=BATCH, threads=a.threads,
                          time_budget_s=a.time_budget)
    spec = ctx.spec
    path = spec.extra["path"]
    chosen = ctx.get(res["chosen"])
    fp32_onnx = ctx.get("fp32-onnx")
    s = hf.sentences()

    contestants: dict[str, object] = {}
    module = ctx.module()

    def torch_fp32(feeds):
        with torch.inference_mode():
            return module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))[0].numpy()

    contestants["fp32-torch (eager)"] = _Run(torch_fp32, "fp32-torch")
    contestants[f"tuned: {chosen.name}"] = ctx.session(chosen, threads=a.threads)

    td = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    with contextlib.redirect_stdout(io.StringIO()):
        q = ORTQuantizer.from_pretrained(str(Path(fp32_onnx.path).parent), file_name=Path(fp32_onnx.path).name)
        q.quantize(save_dir=str(td / "optimum"),
                   quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False))
    qpath = next((td / "optimum").glob("*.onnx"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    osess = ort.InferenceSession(str(qpath), so, providers=["CPUExecutionProvider"])
    contestants["Optimum dynamic INT8 (avx512_vnni)"] = _Run(
        lambda f: osess.run(["sentence_embedding"], {i.name: f[i.name] for i in osess.get_inputs()})[0], "optimum")
    core = ov.Core()
    ovm = ov.convert_model(str(fp32_onnx.path))
    for label, cfg in (("OpenVINO FP32", {"INFERENCE_PRECISION_HINT": "f32"}), ("OpenVINO default config", {})):
        cm = core.compile_model(ovm, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": a.threads, **cfg})
        contestants[f"{label} ({cm.get_property('INFERENCE_PRECISION_HINT')})"] = _Run(
            lambda f, cm=cm: cm.create_infer_request().infer(f)["sentence_embedding"], label)

    rows = {n: {"contestant": n} for n in contestants}
    for n, sess in contestants.items():
        m = AH.sentence_metrics(ctx, sess)
        rows[n].update(cosine=round(m["cosine"], 5), min_cosine=round(m["min_cosine"], 4), recall_at_1=round(m["recall@1"], 4))
        print(f"{n}: {rows[n]}", flush=True)

    feeds = hf.tokenize(path, (s["calibration"] * 2)[:BATCH], pad_to=SEQ)
    load0 = os.getloadavg()
    times: dict[str, list[float]] = {n: [] for n in contestants}
    for sess in contestants.values():
        sess.run(feeds)
    for r in range(a.rounds):
        for n, sess in contestants.items():
            for _ in range(a.reps):
                t0 = time.perf_counter()
                sess.run(feeds)
                times[n].append((time.perf_counter() - t0) * 1e3)
        print(f"b32/s128 round {r + 1}/{a.rounds}", flush=True)
    base = float(np.median(times["fp32-torch (eager)"]))
    for n, ts in times.items():
        rows[n].update(ms=round(float(np.median(ts)), 2), speedup_vs_eager=round(base / float(np.median(ts)), 2),
                       ms_all=[round(x, 1) for x in ts])

    # the corpus at its real lengths: tuned variant (length-sorted, padded per batch) vs sentence-transformers
    corpus = s["corpus"]
    st = SentenceTransformer(path, device="cpu")
    tuned = contestants[f"tuned: {chosen.name}"]
    corpus_t = {"sentence-transformers encode() FP32": [], f"tuned: {chosen.name} (sorted, dynamic padding)": []}
    st.encode(corpus[:64], batch_size=32)
    AH.embed(tuned, path, corpus[:64], batch=32)
    for r in range(a.corpus_rounds):
        t0 = time.perf_counter()
        ref = st.encode(corpus, batch_size=32, convert_to_numpy=True)
        corpus_t["sentence-transformers encode() FP32"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = AH.embed(tuned, path, corpus, batch=32)
        corpus_t[f"tuned: {chosen.name} (sorted, dynamic padding)"].append(time.perf_counter() - t0)
        print(f"corpus round {r + 1}/{a.corpus_rounds}", flush=True)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    st_s = float(np.median(corpus_t["sentence-transformers encode() FP32"]))
    tu_s = float(np.median(corpus_t[f"tuned: {chosen.name} (sorted, dynamic padding)"]))
    tuned_row = rows[f"tuned: {chosen.name}"]
    peers = [n for n in rows if n.startswith(("Optimum", "OpenVINO FP32"))]
    return {
        "tune": {k: res[k] for k in ("chosen", "pareto", "elapsed_s", "skipped", "budget")},
        "tune_trials": [{k: t[k] for k in ("name", "kind", "backend", "precision", "latency_ms", "metric", "drop", "extra",
                                          "meets", "why")} for t in res["trials"] if t["kind"] != "sensitivity"],
        "b32_s128": list(rows.values()), "load_avg_b32": [list(load0), list(os.getloadavg())],
        "corpus": {"sentences": len(corpus), "seconds_rounds": {k: [round(x, 3) for x in v] for k, v in corpus_t.items()},
                   "st_s": round(st_s, 3), "tuned_s": round(tu_s, 3), "speedup": round(st_s / tu_s, 2),
                   "mean_cosine_to_st": round(float(cos.mean()), 5), "min_cosine_to_st": round(float(cos.min()), 4)},
        "bars": {
            "tuned >= 2.0x eager": tuned_row["speedup_vs_eager"] >= 2.0,
            "tuned cosine >= 0.995 and recall@1 >= 0.95": tuned_row["cosine"] >= 0.995 and tuned_row["recall_at_1"] >= 0.95,
            "tuned faster than Optimum dynamic INT8 and OpenVINO FP32": all(tuned_row["ms"] < rows[p]["ms"] for p in peers),
            "corpus >= 3x sentence-transformers": st_s / tu_s >= 3.0,
            "tune finishes in <= 20 min": res["elapsed_s"] <= 1200,
        },
    }


def minilm_int8(a) -> dict:
    """The same budget with ``precisions=("fp32", "int8")`` (a fleet without BF16 hardware): the
    per-layer search has to find which layers INT8 may take (OpenVINO/NNCF and ONNX Runtime bases)."""
    from deepship.pipeline import tune as T

    budget = T.Budget(max_drop=0.005, require={"recall@1": (">=", 0.95)})
    _, res = tune_model("bert", budget, RESULTS / "tune-bert-int8", batch=BATCH, threads=a.threads,
                        time_budget_s=a.time_budget, precisions=("fp32", "int8"))
    c = next((t for t in res["trials"] if t["name"] == res["chosen"]), None)
    base = next(t for t in res["trials"] if t["kind"] == "baseline")
    u = best_uniform(res)
    return {"chosen": res["chosen"], "chosen_kind": c and c["kind"], "chosen_ms": c and c["latency_ms"],
            "chosen_extra": c and c["extra"], "chosen_float_layers": c and len(c["float_layers"]),
            "best_uniform": u and u["name"], "best_uniform_ms": u and u["latency_ms"],
            "eager_fp32_ms": base["latency_ms"], "verification": res["verification"],
            "sensitivity_rows": {k: len(v) for k, v in res["sensitivity"].items()},
            "mixed_trials": [{k: t[k] for k in ("name", "latency_ms", "drop", "extra", "meets")} for t in res["trials"]
                             if t["kind"] == "mixed"],
            "skipped": res["skipped"], "elapsed_s": res["elapsed_s"], "rebuild": rebuild(RESULTS / "tune-bert-int8"),
            "bars": {"tune finishes in <= 20 min": res["elapsed_s"] <= 1200}}


def rebuild(tune_dir: Path) -> dict:
    """``optimize build recipe.toml`` on an empty cache (as CI would): every step rebuilt, and the
    artifacts' SHA-256 compared with the recipe's (strict mode fails on a difference)."""
    from deepship import api
    from deepship.errors import DeepshipError

    if not (tune_dir / "recipe.toml").is_file():
        return {"skipped": "no recipe"}
    prev = os.environ.get("DEEPSHIP_CACHE")
    with tempfile.TemporaryDirectory(prefix="tune-rebuild-") as td:
        os.environ["DEEPSHIP_CACHE"] = td
        try:
            t0 = time.perf_counter()
            _, v, r, warnings = api.build_recipe(tune_dir / "recipe.toml", strict=False)
            out = {"seconds": round(time.perf_counter() - t0, 1), "steps": len(r["step"]), "warnings": warnings,
                   "byte_identical": not warnings and any(s.get("sha256") for s in r["step"])}
        except DeepshipError as e:
            out = {"error": str(e), "byte_identical": False}
        finally:
            if prev is None:
                os.environ.pop("DEEPSHIP_CACHE", None)
            else:
                os.environ["DEEPSHIP_CACHE"] = prev
    return out


def other(a, model: str) -> dict:
    from deepship.pipeline import tune as T

    if model == "cnn":
        budget, kw = T.Budget(max_drop=0.5), {"objective": "latency", "batch": BATCH}
    else:
        budget, kw = T.Budget(max_rel_drop=0.01), {"objective": "size", "batch": 1, "backends": ("torch", "onnxruntime")}
    _, res = tune_model(model, budget, RESULTS / f"tune-{model}", threads=a.threads, time_budget_s=a.time_budget, **kw)
    key = "latency_ms" if kw["objective"] == "latency" else "size_bytes"
    c = next((t for t in res["trials"] if t["name"] == res["chosen"]), None)
    u = best_uniform(res)
    int8 = [t for t in res["trials"] if t["kind"] == "uniform" and t["precision"] == "int8" and not t["error"]]
    out = {"objective": kw["objective"], "budget": res["budget"], "chosen": res["chosen"],
           "chosen_value": c and c[key], "chosen_drop": c and c["drop"], "chosen_kind": c and c["kind"],
           "best_uniform": u and u["name"], "best_uniform_value": u and u[key], "best_uniform_drop": u and u["drop"],
           "skipped": res["skipped"], "elapsed_s": res["elapsed_s"],
           "bar: tuned at least as good as the best uniform": bool(c and u and c[key] <= u[key] * 1.000001)}
    if model == "gpt" and int8:
        i8 = min(int8, key=lambda t: t["size_bytes"])
        out.update(uniform_int8=i8["name"], uniform_int8_bytes=i8["size_bytes"], uniform_int8_rel_drop=i8["rel_drop"],
                   **{"bar: smaller than uniform INT8 at <= +1% perplexity": bool(c and c["size_bytes"] < i8["size_bytes"])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--corpus-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=1500.0, help="seconds per model's tune")
    ap.add_argument("--skip", default="", help="comma-separated: bert,cnn,gpt,bert-int8")
    a = ap.parse_args()
    from deepship.utils import machine_info

    skip = set(filter(None, a.skip.split(",")))
    result = {"machine": machine_info(), "load_avg_start": list(os.getloadavg()), "threads": a.threads}
    out = RESULTS / "tune.json"
    if out.is_file():  # keep the sections this run skips
        result = {**json.loads(out.read_text()), **result}
    for m in ("bert", "cnn", "gpt", "bert-int8"):
        if m in skip:
            continue
        result[m] = minilm(a) if m == "bert" else minilm_int8(a) if m == "bert-int8" else other(a, m)
        print(json.dumps(result[m].get("bars", result[m]), indent=1, default=str), flush=True)
    result["load_avg_end"] = list(os.getloadavg())
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
