"""The generative family's adapter (``gan``, ``ddpm``, ``flow``): report rows, and evaluation over
generated samples: 450 digits (45 per class, fixed seeds) sampled through each variant's own session
(:mod:`deepship.models.generative`'s samplers), scored by the Frechet distance (the FID formula, Heusel
et al. 2017) on the zoo ``cnn``'s penultimate features against the held-out digits, plus the ``cnn``'s
accuracy on the conditional samples."""
from __future__ import annotations

import functools
import time
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ...errors import InputSpecError
from ...models import generative as G
from ...models.spec import ModelSpec
from ...models.train import trained_model
from ...models.vision import cnn_spec
from ...models.vision.data import digits
from ..adapters import ArchAdapter, register_adapter


def plan(spec: ModelSpec, default_plan: list) -> list:
    """The report's rows: FP32 torch (baseline), FP32 ONNX, INT8 dynamic, INT8 static QDQ (per-channel,
    MinMax calibration on 256 representative training inputs), FP16. Quantize rows whose method the
    default plan left out (``optimize report --methods``) are dropped; an empty default keeps them all."""
    methods = {e[2] for e in default_plan if e[1] == "quantize"}
    return [e for e in _PLAN if e[1] != "quantize" or not default_plan or e[2] in methods]


_PLAN = [("fp32-onnx", "export", "onnx", {}, "fp32-torch"),
         ("int8-dynamic", "quantize", "int8-dynamic", {}, "fp32-onnx"),
         ("int8-static", "quantize", "int8-static", {"calibration": "minmax", "per_channel": True}, "fp32-onnx"),
         ("fp16", "quantize", "fp16", {}, "fp32-onnx")]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, the FID formula of Heusel et al.
    2017 (here on LeNet features, see :func:`frechet_to_real`).

    ``tr((sigma1 sigma2)^(1/2))`` is computed as ``tr((s1^(1/2) sigma2 s1^(1/2))^(1/2))`` (same
    eigenvalues, but a symmetric PSD matrix), with ``s1^(1/2)`` from ``scipy.linalg.eigh`` and the
    trace from ``scipy.linalg.eigvalsh``: stable for the singular covariances that ReLU features
    give (dead units), where ``sqrtm(sigma1 @ sigma2)`` warns and returns complex noise.

    Raises:
        InputSpecError: shapes that do not match ``(d,)`` and ``(d, d)``.
    """
    from scipy import linalg  # scipy.linalg loads slowly; only the metric needs it

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise InputSpecError(f"Frechet distance needs means (d,) and covariances (d, d); got {mu1.shape}, "
                             f"{s1.shape}, {mu2.shape}, {s2.shape}")
    w, v = linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # sqrtm of a symmetric PSD matrix, without its warnings
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and covariance ``(d, d)`` (float64) of ``(n, d)`` features."""
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


@functools.lru_cache(maxsize=1)
def feature_model() -> nn.Module:
    """The zoo's trained ``cnn`` (LeNet on the digits; committed weights), eval mode."""
    model, _ = trained_model(cnn_spec())
    return model.eval()


def classifier_features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LeNet features and logits of images float32 ``(n, 1, 8, 8)`` in [0, 1].

    Returns:
        ``(features float64 (n, 128), logits float32 (n, 10))``: features are the penultimate fc
        layer after ReLU.
    """
    m = feature_model()
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
        h = m.classifier[:3](m.features(x))
        return h.double().numpy(), m.classifier[3](h).numpy()


@functools.lru_cache(maxsize=1)
def real_stats() -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of the 450 held-out real digits (memoized per process)."""
    return gaussian_stats(classifier_features(digits(True).test.inputs["x"])[0])


def frechet_to_real(images: np.ndarray) -> float:
    """Frechet distance between generated images float32 ``(n, 1, 8, 8)`` in [0, 1] and the held-out digits."""
    return frechet_distance(*gaussian_stats(classifier_features(images)[0]), *real_stats())


@functools.lru_cache(maxsize=1)
def real_floor() -> float:
    """Frechet distance between 450 real training digits (45 per class, seed 0) and the 450 held-out
    ones: the value a perfect generator would get with this sample size."""
    tr = digits(True).train
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(tr.targets == c), G.EVAL_PER_CLASS, replace=False)
                          for c in range(G.CLASSES)])
    return frechet_to_real(tr.inputs["x"][idx])


def eval_labels(per_class: int = G.EVAL_PER_CLASS) -> np.ndarray:
    """Balanced labels, int64 ``(10 * per_class,)``: 0, 0, ..., 9."""
    return np.repeat(np.arange(G.CLASSES, dtype=np.int64), per_class)


def score(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"frechet": FD to held-out digits, "class_acc": cnn accuracy on the conditional samples}``."""
    _, logits = classifier_features(images)
    return {"frechet": frechet_to_real(images), "class_acc": float((logits.argmax(1) == labels).mean())}


#: per session, its sampling results keyed by sampler settings: the metric and the notes share them
_SCORED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def sample(kind: str, session, labels: np.ndarray, steps: int | None = None, seed: int = 0,
           method: str = G.FLOW_EVAL_METHOD) -> np.ndarray:
    """Sample ``kind`` (``gan``, ``ddpm``, ``flow``) through ``session``; float32 ``(n, 1, 8, 8)`` in [0, 1].

    Raises:
        InputSpecError: an unknown kind, bad labels or steps.
    """
    if kind == "gan":
        return G.sample_gan(session, labels, seed=seed)
    if kind == "ddpm":
        return G.sample_ddpm(session, labels, steps=G.DDPM_EVAL_STEPS if steps is None else steps, seed=seed)
    if kind == "flow":
        return G.sample_flow(session, labels, steps=G.FLOW_EVAL_STEPS if steps is None else steps, seed=seed, method=method)
    raise InputSpecError(f"unknown generative model '{kind}'; use gan, ddpm or flow")


def evaluate_samples(kind: str, session, steps: int | None = None, method: str = G.FLOW_EVAL_METHOD,
                     per_class: int = G.EVAL_PER_CLASS, seed: int = 0) -> dict[str, float]:
    """Sample ``per_class`` digits of each class through ``session`` and score them (memoized per
    session and settings).

    Returns:
        ``{"frechet", "class_acc", "sample_s"}`` (``sample_s``: wall seconds of the sampling).
    """
    memo = _SCORED.setdefault(session, {})
    key = (kind, steps, method if kind == "flow" else None, per_class, seed)
    if key not in memo:
        labels = eval_labels(per_class)
        t0 = time.perf_counter()
        imgs = sample(kind, session, labels, steps=steps, seed=seed, method=method)
        memo[key] = {**score(imgs, labels), "sample_s": time.perf_counter() - t0}
    return dict(memo[key])


def measure(ctx: Any, variant: Any, session: Any) -> dict:
    """The report's notes for one variant: classifier accuracy on the conditional samples, sampling
    time, the real-vs-real floor and (ddpm, flow) the Frechet distance against sampling steps."""
    kind = ctx.spec.extra["kind"]
    r = evaluate_samples(kind, session)
    out: dict[str, Any] = {"class_acc": round(r["class_acc"], 4), "sample_s": round(r["sample_s"], 2)}
    if kind == "ddpm":
        for s in G.DDPM_STEP_SWEEP:
            out[f"fd@{s}steps"] = round(evaluate_samples(kind, session, steps=s)["frechet"], 3)
    elif kind == "flow":
        for m, sweep in (("euler", G.FLOW_STEP_SWEEP), ("midpoint", G.FLOW_STEP_SWEEP[:-1])):
            for s in sweep:
                out[f"fd@{s}{m}"] = round(evaluate_samples(kind, session, steps=s, method=m)["frechet"], 3)
    out["fd_real_floor"] = round(real_floor(), 3)
    return out


register_adapter(ArchAdapter("generative", plan=plan, measure=measure,
                             evaluate=lambda ctx, session: evaluate_samples(ctx.spec.extra["kind"], session)["frechet"]))
