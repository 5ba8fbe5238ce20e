"""Evaluate a variant on held-out real data and measure its output drift against the FP32 baseline."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..models.spec import SECOND_DIM_SIZES
from ..runtimes.benchmark import measure, plain_loop_ms


def eval_feeds(ctx) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    """Held-out inputs and targets, or seeded random inputs (64 samples) when the model has no data."""
    ds = ctx.dataset()
    if ds is not None:
        return ds.test.inputs, ds.test.targets, ds.source
    return ctx.spec.example_inputs({**SECOND_DIM_SIZES, "batch": 64}, seed=11), None, "64 seeded random inputs"


def bench_feeds(ctx, batch: int) -> dict[str, np.ndarray]:
    """Inputs for timing at ``batch``: real held-out samples (tiled if fewer), else random inputs."""
    ds = ctx.dataset()
    if ds is not None:
        out = {}
        for k, v in ds.test.inputs.items():
            reps = int(np.ceil(batch / len(v)))
            out[k] = np.ascontiguousarray(np.concatenate([v] * reps)[:batch])
        return out
    return ctx.spec.example_inputs({"batch": batch}, seed=3)


#: tasks whose 2-D outputs are class scores, where top-1 agreement means something (not embeddings)
ARGMAX_TASKS = ("classification", "other")


def drift(out: np.ndarray, ref: np.ndarray, argmax: bool = True) -> dict[str, float]:
    """Output drift against the reference.

    Returns:
        ``max_abs``, ``mean_abs``, ``max_rel`` (max abs error / max |ref|) and, with ``argmax`` and
        2-D outputs with more than one column, ``top1_agreement`` (fraction of rows with the same argmax).
    """
    a, b = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if a.shape != b.shape:
        return {"shape_mismatch": 1.0}
    err = np.abs(a - b)
    d = {"max_abs": float(err.max()) if err.size else 0.0, "mean_abs": float(err.mean()) if err.size else 0.0,
         "max_rel": float(err.max() / max(np.abs(b).max(), 1e-12)) if err.size else 0.0}
    if argmax and a.ndim == 2 and a.shape[1] > 1:
        d["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
    return d


def evaluate(ctx, session, reference: np.ndarray | None) -> dict[str, Any]:
    """Run ``session`` over the held-out split.

    Returns:
        ``{"metric": float|None, "drift": {...}|None, "outputs": np.ndarray}`` where ``outputs`` is the
        first output over all held-out samples.
    """
    feeds, targets, _ = eval_feeds(ctx)
    out = session.run_batched(feeds, batch_size=256)
    first = out[session.output_names[0]] if session.output_names[0] in out else next(iter(out.values()))
    spec = ctx.spec
    metric = None
    if spec.evaluate is not None:  # the user's evaluation function, or the spec's own (perplexity)
        metric = float(spec.evaluate(session))
    elif ctx.arch.evaluate is not None:  # the family's evaluation over a session (streaming CER, ...)
        m = ctx.arch.evaluate(ctx, session)
        metric = None if m is None else float(m)
    elif spec.metric is not None and spec.metric.fn is not None and targets is not None:
        metric = float(spec.metric.fn(first, targets))
    d = drift(first, reference, argmax=spec.task in ARGMAX_TASKS) if reference is not None else None
    return {"metric": metric, "drift": d, "outputs": first}


def compare_with_baseline(ctx, variant, batches=(1, 32), threads: int | None = None,
                          min_time_s: float = 0.25) -> dict[str, Any]:
    """``variant`` against the FP32 PyTorch baseline: output drift on the held-out inputs (parity) and
    p50 latency at each batch size, timed in alternation so both see the same machine load.

    Returns:
        ``{"drift": {...}, "samples": int, "data": str, "latency_ms": {batch: {"engine": ms, "fp32-torch": ms}}}``.
    """
    feeds, _, source = eval_feeds(ctx)
    base = ctx.session(ctx.baseline(), threads=threads)
    sess = ctx.session(variant, threads=threads)
    name = base.output_names[0]
    ref = base.run_batched(feeds, batch_size=256)[name]
    got = sess.run_batched(feeds, batch_size=256)
    got = got[name] if name in got else next(iter(got.values()))
    lat = {}
    for b in batches:
        f = bench_feeds(ctx, b)
        t = {"fp32-torch": [], "engine": []}
        for _ in range(2):  # interleaved rounds
            t["fp32-torch"].append(measure(base, f, min_time_s=min_time_s / 2, batch=b).p50_ms)
            t["engine"].append(measure(sess, f, min_time_s=min_time_s / 2, batch=b).p50_ms)
        lat[str(b)] = {k: float(np.median(v)) for k, v in t.items()}
    return {"drift": drift(got, ref, argmax=ctx.spec.task in ARGMAX_TASKS), "samples": len(ref), "data": source,
            "latency_ms": lat}


def harness_agreement(ctx, batches=(1, 32), rounds: int = 3, min_time_s: float = 0.5) -> list[dict[str, Any]]:
    """The harness's FP32 PyTorch p50 (:func:`deepship.runtimes.benchmark.measure` over the baseline's
    Session, as the report times it) against a bare loop over the same module
    (:func:`deepship.runtimes.benchmark.plain_loop_ms`), alternated ``rounds`` times per batch size.

    Returns:
        one row per batch: ``{"batch", "report_p50_ms", "plain_loop_p50_ms", "ratio", "rounds", "threads"}``
        (medians over the rounds; ratio = report / plain).
    """
    import torch

    sess = ctx.session(ctx.baseline())
    mod = ctx.module()
    rows = []
    for b in batches:
        feeds = bench_feeds(ctx, b)
        args = [torch.from_numpy(feeds[t.name]) for t in ctx.spec.inputs]
        rep, plain = [], []
        for _ in range(rounds):
            rep.append(measure(sess, feeds, min_time_s=min_time_s, batch=b).p50_ms)
            with torch.inference_mode():
                plain.append(plain_loop_ms(lambda: mod(*args), min_time_s=min_time_s))
        rows.append({"batch": b, "report_p50_ms": float(np.median(rep)), "plain_loop_p50_ms": float(np.median(plain)),
                     "ratio": float(np.median(rep) / np.median(plain)), "rounds": rounds,
                     "threads": torch.get_num_threads()})
    return rows
