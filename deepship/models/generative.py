"""Class-conditional generative models on scikit-learn's 8x8 digits: a GAN, a DDPM and flow matching.

| zoo name | method | deployed graph | sampler |
|---|---|---|---|
| ``gan`` | DCGAN-style generator (Radford et al. 2016, arXiv:1511.06434), non-saturating loss (Goodfellow et al. 2014), projection discriminator with spectral norm (Miyato & Koyama 2018, arXiv:1802.05637; Miyato et al. 2018, arXiv:1802.05957) | generator ``(z, y) -> image`` | one network call |
| ``ddpm`` | DDPM (Ho et al. 2020, arXiv:2006.11239): epsilon prediction, linear beta schedule, T = 1000 | UNet denoiser ``(x, t, y) -> eps`` | DDIM (Song et al. 2021, arXiv:2010.02502), eta 0, few steps |
| ``flow`` | flow matching (Lipman et al. 2023, arXiv:2210.02747) on the linear (rectified / OT) path ``x_t = (1 - t) x0 + t x1`` | same UNet family ``(x, t, y) -> velocity`` | Euler or midpoint ODE steps |

All three are class-conditional (labels 0..9, ``int64``), trained on the 1,347 training digits only
(:func:`deepship.models.data.digits`), seeded, and take 1-3 minutes on 2 CPU cores.

Exported graph contracts (dynamic dim ``batch``):

- ``gan``: ``z: float32[batch, 32]`` (standard normal), ``y: int64[batch]`` -> ``image: float32[batch, 1, 8, 8]``
  in [0, 1] (the digits' pixel scale: ink / 16).
- ``ddpm``: ``x: float32[batch, 1, 8, 8]`` (noised sample, pixels scaled to [-1, 1]: ``2 * p - 1``),
  ``t: float32[batch]`` (diffusion step index in [0, 1000)), ``y: int64[batch]`` -> ``eps: float32[batch, 1, 8, 8]``
  (predicted unit-variance noise).
- ``flow``: ``x: float32[batch, 1, 8, 8]`` (point on the path; ``x0`` noise at ``t = 0``, data in [-1, 1] at
  ``t = 1``), ``t: float32[batch]`` in [0, 1], ``y: int64[batch]`` -> ``velocity: float32[batch, 1, 8, 8]``.

The metric (:data:`FRECHET`, lower is better) is the FID formula (Heusel et al. 2017, arXiv:1706.08500)
on the features of the zoo's trained ``cnn`` (LeNet, penultimate 128-d fc layer after ReLU) instead of
Inception features: 450 generated digits (45 per class, fixed seeds), sampled through the variant's own
session, against the 450 held-out real digits. Because the samplers call ``session.run``, every
variant (torch, FP32 ONNX, INT8, FP16) is evaluated on its own outputs. The report's notes add the
``cnn`` classifier's accuracy on the conditional samples, the Frechet distance against the number of
sampling steps (``ddpm``, ``flow``) and the real-vs-real floor (450 training digits against the
held-out digits).
"""
from __future__ import annotations

import functools
import math
import time
import weakref
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputSpecError
from . import data as D
from .spec import Dataset, Metric, ModelSpec, Split, TensorSpec
from .train import fp16_storage, round_to_storage, seed_everything, train_log

CLASSES = 10
Z_DIM = 32
#: DDPM diffusion steps and linear beta schedule (Ho et al. 2020)
T_STEPS = 1000
BETA_1, BETA_T = 1e-4, 0.02
#: samples per evaluation: 45 per class, the size of the held-out split
EVAL_PER_CLASS = 45
#: the metric's sampler settings (the report's metric column) ...
DDPM_EVAL_STEPS = 25
FLOW_EVAL_STEPS = 8
FLOW_EVAL_METHOD = "midpoint"
#: ... and the steps swept in the report's notes
DDPM_STEP_SWEEP = (5, 10, 25, 50)
FLOW_STEP_SWEEP = (2, 4, 8, 16)

#: Frechet distance on the digits classifier's features (lower is better); only the spec's ``evaluate``
#: computes it, by sampling through the session
FRECHET = Metric("frechet", False, None)


# ---- networks -----------------------------------------------------------------------------------

class Generator(nn.Module):
    """DCGAN-style conditional generator (Radford et al. 2016), sized for 8x8 digits.

    ``[z, embed(y)] -> Linear -> (ch*4, 2, 2) -> ConvT -> (ch*2, 4, 4) -> ConvT -> (ch, 8, 8) -> Conv -> sigmoid``,
    with BatchNorm + ReLU after each hidden layer (folded into the convolutions at export; eval mode).

    Inputs: ``z`` float32 ``(batch, z_dim)`` standard normal; ``y`` int64 ``(batch,)`` in 0..9.
    Output: float32 ``(batch, 1, 8, 8)`` in [0, 1].
    """

    def __init__(self, z_dim: int = Z_DIM, ch: int = 32, emb: int = 16, classes: int = CLASSES):
        super().__init__()
        self.z_dim, self.ch = z_dim, ch
        self.label = nn.Embedding(classes, emb)
        self.fc = nn.Linear(z_dim + emb, ch * 4 * 4, bias=False)
        self.bn0 = nn.BatchNorm1d(ch * 4 * 4)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(ch * 4, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.ReLU(),  # 2 -> 4
            nn.ConvTranspose2d(ch * 2, ch, 4, 2, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(),  # 4 -> 8
            nn.Conv2d(ch, 1, 3, padding=1), nn.Sigmoid())
        self.register_state_dict_post_hook(fp16_storage)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.fc(torch.cat([z, self.label(y)], 1))))
        return self.net(h.unflatten(1, (self.ch * 4, 2, 2)))


class Discriminator(nn.Module):
    """DCGAN-style conditional discriminator with a projection head (Miyato & Koyama 2018), spectral
    norm on every layer (Miyato et al. 2018) and, with ``mbstd``, a minibatch standard-deviation
    feature (Karras et al. 2018, arXiv:1710.10196) that lets it see a lack of variety (mode collapse).
    Input float32 ``(batch, 1, 8, 8)`` in [0, 1] and int64 labels ``(batch,)``; output logits float32
    ``(batch,)`` (real > 0). Used in training only."""

    def __init__(self, ch: int = 64, classes: int = CLASSES, mbstd: bool = False):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.mbstd = mbstd
        self.net = nn.Sequential(
            sn(nn.Conv2d(1, ch, 3, padding=1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(ch, ch, 4, 2, 1)), nn.LeakyReLU(0.2))  # 8 -> 4
        self.net2 = nn.Sequential(
            sn(nn.Conv2d(ch + int(mbstd), ch * 2, 4, 2, 1)), nn.LeakyReLU(0.2), nn.Flatten())  # 4 -> 2
        feat = ch * 2 * 4
        self.out = sn(nn.Linear(feat, 1))
        self.proj = sn(nn.Embedding(classes, feat))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net(x * 2 - 1)
        if self.mbstd:
            sd = h.std(0).mean().expand(h.shape[0], 1, h.shape[2], h.shape[3])
            h = torch.cat([h, sd], 1)
        h = self.net2(h)
        return self.out(h).squeeze(1) + (self.proj(y) * h).sum(1)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017; as in Ho et al. 2020): float32 ``(batch,)`` -> ``(batch, dim)``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(a), torch.cos(a)], 1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with the time+label embedding added between the convs."""

    def __init__(self, cin: int, cout: int, emb: int, groups: int = 8):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.n2, self.c2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.emb(e)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class UNet(nn.Module):
    """Small conditional UNet for 8x8 images: 8x8 -> 4x4 -> 8x8 with a skip connection, sinusoidal time
    embedding plus a label embedding, GroupNorm + SiLU (the DDPM UNet of Ho et al. 2020, scaled down).

    Inputs: ``x`` float32 ``(batch, 1, 8, 8)``; ``t`` float32 ``(batch,)`` (multiplied by ``t_scale``
    before the sinusoidal embedding: 1 for DDPM step indices in [0, 1000), 1000 for flow times in
    [0, 1]); ``y`` int64 ``(batch,)`` in 0..9. Output float32 ``(batch, 1, 8, 8)`` (noise or velocity).
    """

    def __init__(self, ch: int = 32, emb: int = 64, t_scale: float = 1.0, classes: int = CLASSES):
        super().__init__()
        self.emb_dim, self.t_scale = emb, float(t_scale)
        self.t_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(classes, emb)
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.d1 = ResBlock(ch, ch, emb)
        self.down = nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1)  # 8 -> 4
        self.d2 = ResBlock(ch * 2, ch * 2, emb)
        self.mid = ResBlock(ch * 2, ch * 2, emb)
        self.up = nn.ConvTranspose2d(ch * 2, ch, 4, 2, 1)  # 4 -> 8
        self.u1 = ResBlock(ch * 2, ch, emb)
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))
        self.register_state_dict_post_hook(fp16_storage)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = F.silu(self.t_mlp(timestep_embedding(t * self.t_scale, self.emb_dim)) + self.label(y))
        h1 = self.d1(self.inp(x), e)
        h = self.mid(self.d2(self.down(h1), e), e)
        h = self.u1(torch.cat([self.up(h), h1], 1), e)
        return self.out(h)


# ---- DDPM schedule ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def alpha_bar() -> np.ndarray:
    """Cumulative product of ``1 - beta_t`` for the linear schedule, float64 ``(T_STEPS,)``."""
    return np.cumprod(1.0 - np.linspace(BETA_1, BETA_T, T_STEPS))


def to_model_range(img: np.ndarray | torch.Tensor):
    """Pixels [0, 1] -> the diffusion models' [-1, 1]."""
    return img * 2 - 1


def to_pixels(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> pixels in [0, 1] (clipped), float32."""
    return np.clip((np.asarray(x, np.float32) + 1) / 2, 0.0, 1.0)


# ---- samplers (over any session: torch, ONNX Runtime, INT8, ...) ---------------------------------

def _check_labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InputSpecError(f"labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= CLASSES):
        raise InputSpecError(f"labels must be digits 0..{CLASSES - 1}, got {int(y.min())}..{int(y.max())}")
    return y.astype(np.int64)


def _check_steps(steps: int, most: int | None = None) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise InputSpecError(f"sampling steps must be a positive integer, got {steps!r}")
    if most is not None and steps > most:
        raise InputSpecError(f"sampling steps must be at most {most} (the diffusion's T), got {steps}")
    return int(steps)


def _first(out: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.asarray(next(iter(out.values())), np.float32)


def sample_gan(session, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Generate one digit per label through a generator ``session`` (``.run(feeds) -> dict``).

    Args:
        y: int64 labels ``(n,)`` in 0..9.
        seed: seeds ``z ~ N(0, I)``, float32 ``(n, 32)``.

    Returns:
        float32 ``(n, 1, 8, 8)`` in [0, 1].

    Raises:
        InputSpecError: labels that are not 1-D integers in 0..9.
    """
    y = _check_labels(y)
    z = np.random.default_rng(seed).standard_normal((len(y), Z_DIM)).astype(np.float32)
    return np.clip(_first(session.run({"z": z, "y": y})), 0.0, 1.0)


def ddim_timesteps(steps: int) -> np.ndarray:
    """``steps`` evenly spaced step indices from T-1 down to 0, int64 ``(steps,)``.

    Raises:
        InputSpecError: ``steps`` is not in 1..T.
    """
    steps = _check_steps(steps, T_STEPS)
    return np.round(np.linspace(T_STEPS - 1, 0, steps)).astype(np.int64)


def sample_ddpm(session, y: np.ndarray, steps: int = DDPM_EVAL_STEPS, seed: int = 0, eta: float = 0.0) -> np.ndarray:
    """DDIM sampling (Song et al. 2021) with the DDPM denoiser ``session`` (epsilon prediction).

    ``eta = 0`` is the deterministic DDIM ODE sampler; ``eta = 1`` is ancestral DDPM-style sampling on
    the strided schedule. The predicted ``x0`` is clipped to [-1, 1] at every step (as Ho et al. do).

    Args:
        session: anything with ``.run({"x", "t", "y"}) -> {name: eps}``.
        y: int64 labels ``(n,)`` in 0..9.
        steps: network evaluations, 1..1000.
        seed: seeds the initial noise and, with ``eta > 0``, the per-step noise.

    Returns:
        float32 ``(n, 1, 8, 8)`` pixels in [0, 1].

    Raises:
        InputSpecError: bad labels, ``steps`` outside 1..1000, or ``eta < 0``.
    """
    y = _check_labels(y)
    ts = ddim_timesteps(steps)
    if not eta >= 0:
        raise InputSpecError(f"eta must be >= 0, got {eta}")
    rng = np.random.default_rng(seed)
    ab = alpha_bar()
    x = rng.standard_normal((len(y), 1, 8, 8))
    for i, t in enumerate(ts):
        a_t = ab[t]
        a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = _first(session.run({"x": x.astype(np.float32), "t": np.full(len(y), t, np.float32), "y": y}))
        x0 = np.clip((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t), -1.0, 1.0)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * rng.standard_normal(x.shape)
    return to_pixels(x)


def sample_flow(session, y: np.ndarray, steps: int = FLOW_EVAL_STEPS, seed: int = 0,
                method: str = FLOW_EVAL_METHOD) -> np.ndarray:
    """Integrate the learned velocity field from noise (t = 0) to data (t = 1) with fixed steps.

    Args:
        session: anything with ``.run({"x", "t", "y"}) -> {name: velocity}``.
        y: int64 labels ``(n,)`` in 0..9.
        steps: ODE steps (``euler``: one network call each, ``midpoint``: two).
        seed: seeds the initial noise ``x0 ~ N(0, I)``.
        method: ``"euler"`` or ``"midpoint"``.

    Returns:
        float32 ``(n, 1, 8, 8)`` pixels in [0, 1].

    Raises:
        InputSpecError: bad labels, ``steps <= 0`` or an unknown method.
    """
    y = _check_labels(y)
    steps = _check_steps(steps)
    if method not in ("euler", "midpoint"):
        raise InputSpecError(f"unknown ODE method '{method}'; use euler or midpoint")
    x = np.random.default_rng(seed).standard_normal((len(y), 1, 8, 8)).astype(np.float32)
    dt = 1.0 / steps

    def v(x, t):
        return _first(session.run({"x": x.astype(np.float32), "t": np.full(len(y), t, np.float32), "y": y}))

    for i in range(steps):
        t = i * dt
        if method == "euler":
            x = x + dt * v(x, t)
        else:
            x = x + dt * v(x + 0.5 * dt * v(x, t), t + 0.5 * dt)
    return to_pixels(x)


# ---- Frechet distance on the digits classifier's features ---------------------------------------

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
    from scipy import linalg

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
    from .train import trained_model
    from .zoo import ZOO

    model, _ = trained_model(ZOO["cnn"]())
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
    return gaussian_stats(classifier_features(D.digits(True).test.inputs["x"])[0])


def frechet_to_real(images: np.ndarray) -> float:
    """Frechet distance between generated images float32 ``(n, 1, 8, 8)`` in [0, 1] and the held-out digits."""
    return frechet_distance(*gaussian_stats(classifier_features(images)[0]), *real_stats())


@functools.lru_cache(maxsize=1)
def real_floor() -> float:
    """Frechet distance between 450 real training digits (45 per class, seed 0) and the 450 held-out
    ones: the value a perfect generator would get with this sample size."""
    tr = D.digits(True).train
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(tr.targets == c), EVAL_PER_CLASS, replace=False)
                          for c in range(CLASSES)])
    return frechet_to_real(tr.inputs["x"][idx])


def eval_labels(per_class: int = EVAL_PER_CLASS) -> np.ndarray:
    """Balanced labels, int64 ``(10 * per_class,)``: 0, 0, ..., 9."""
    return np.repeat(np.arange(CLASSES, dtype=np.int64), per_class)


def score(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"frechet": FD to held-out digits, "class_acc": cnn accuracy on the conditional samples}``."""
    _, logits = classifier_features(images)
    return {"frechet": frechet_to_real(images), "class_acc": float((logits.argmax(1) == labels).mean())}


#: per session, its sampling results keyed by sampler settings: the metric and the notes share them
_SCORED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def sample(kind: str, session, labels: np.ndarray, steps: int | None = None, seed: int = 0,
           method: str = FLOW_EVAL_METHOD) -> np.ndarray:
    """Sample ``kind`` (``gan``, ``ddpm``, ``flow``) through ``session``; float32 ``(n, 1, 8, 8)`` in [0, 1].

    Raises:
        InputSpecError: an unknown kind, bad labels or steps.
    """
    if kind == "gan":
        return sample_gan(session, labels, seed=seed)
    if kind == "ddpm":
        return sample_ddpm(session, labels, steps=DDPM_EVAL_STEPS if steps is None else steps, seed=seed)
    if kind == "flow":
        return sample_flow(session, labels, steps=FLOW_EVAL_STEPS if steps is None else steps, seed=seed, method=method)
    raise InputSpecError(f"unknown generative model '{kind}'; use gan, ddpm or flow")


def evaluate_samples(kind: str, session, steps: int | None = None, method: str = FLOW_EVAL_METHOD,
                     per_class: int = EVAL_PER_CLASS, seed: int = 0) -> dict[str, float]:
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


def _measure(kind: str) -> Callable[[Any, Any, Any], dict]:
    def measure(ctx: Any, variant: Any, session: Any) -> dict:
        """The report's notes for one variant: classifier accuracy on the conditional samples, sampling
        time, the real-vs-real floor and (ddpm, flow) the Frechet distance against sampling steps."""
        r = evaluate_samples(kind, session)
        out: dict[str, Any] = {"class_acc": round(r["class_acc"], 4), "sample_s": round(r["sample_s"], 2)}
        if kind == "ddpm":
            for s in DDPM_STEP_SWEEP:
                out[f"fd@{s}steps"] = round(evaluate_samples(kind, session, steps=s)["frechet"], 3)
        elif kind == "flow":
            for m, sweep in (("euler", FLOW_STEP_SWEEP), ("midpoint", FLOW_STEP_SWEEP[:-1])):
                for s in sweep:
                    out[f"fd@{s}{m}"] = round(evaluate_samples(kind, session, steps=s, method=m)["frechet"], 3)
        out["fd_real_floor"] = round(real_floor(), 3)
        return out

    return measure


# ---- training -----------------------------------------------------------------------------------

def _digits_train() -> Dataset:
    return D.digits(True)


def _loss_stats(losses: list[float], t0: float) -> dict:
    k = max(1, len(losses) // 10)
    return {"train_s": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-k:])),
            "first_loss": float(np.mean(losses[:k])), "steps": len(losses)}


def train_gan(gen: Generator, ds: Dataset, recipe: dict) -> dict:
    """Train the generator against a projection discriminator with the non-saturating loss.

    Adam (lr ``recipe["lr"]``, betas 0.5/0.999 as in DCGAN), ``recipe["steps"]`` steps of batch
    ``recipe["batch_size"]`` real training digits with their labels. At the end the generator's
    BatchNorm running statistics are re-estimated over ``recipe["bn_batches"]`` generated batches (so
    the eval-mode graph sees the statistics of generation) and weights are rounded to the float16
    storage. Returns ``{"train_s", "final_loss" (discriminator), "first_loss", "g_loss", "steps"}``.
    """
    seed = int(recipe.get("seed", 0))
    seed_everything(seed)
    log = recipe.get("_log")
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(ds.train.inputs["x"])
    yl = torch.from_numpy(ds.train.targets)
    disc = Discriminator(int(recipe.get("d_ch", 64)), mbstd=bool(recipe.get("d_mbstd", False)))
    hinge = recipe.get("loss", "non-saturating") == "hinge"
    betas = (0.5, 0.999)
    og = torch.optim.Adam(gen.parameters(), lr=float(recipe["lr"]), betas=betas)
    od = torch.optim.Adam(disc.parameters(), lr=float(recipe.get("d_lr", recipe["lr"])), betas=betas)
    bs, steps = int(recipe["batch_size"]), int(recipe["steps"])
    d_losses, g_losses = [], []
    t0 = time.perf_counter()
    gen.train()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x), bs))
        xr, yr = x[idx], yl[idx]
        z = torch.randn(bs, gen.z_dim)
        yf = torch.randint(0, CLASSES, (bs,))
        fake = gen(z, yf)
        if hinge:
            d_loss = F.relu(1 - disc(xr, yr)).mean() + F.relu(1 + disc(fake.detach(), yf)).mean()
        else:
            d_loss = F.softplus(-disc(xr, yr)).mean() + F.softplus(disc(fake.detach(), yf)).mean()
        od.zero_grad(set_to_none=True)
        d_loss.backward()
        od.step()
        g_loss = -disc(fake, yf).mean() if hinge else F.softplus(-disc(fake, yf)).mean()  # non-saturating
        og.zero_grad(set_to_none=True)
        g_loss.backward()
        og.step()
        d_losses.append(d_loss.item())
        g_losses.append(g_loss.item())
        if log and (step + 1) % 500 == 0:
            log(f"step {step + 1}/{steps} d {np.mean(d_losses[-500:]):.3f} g {np.mean(g_losses[-500:]):.3f}")
    _recalibrate_bn(gen, int(recipe.get("bn_batches", 20)), bs)
    gen.eval()
    round_to_storage(gen)
    return {**_loss_stats(d_losses, t0), "g_loss": float(np.mean(g_losses[-max(1, steps // 10):]))}


def _recalibrate_bn(gen: Generator, batches: int, bs: int) -> None:
    """Re-estimate BatchNorm running mean/var as the plain average over ``batches`` generated batches."""
    bns = [m for m in gen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    gen.train()
    with torch.no_grad():
        for _ in range(batches):
            gen(torch.randn(bs, gen.z_dim), torch.randint(0, CLASSES, (bs,)))
    for m in bns:
        m.momentum = 0.1


def train_denoiser(model: UNet, ds: Dataset, recipe: dict) -> dict:
    """Train the UNet as a DDPM noise predictor (``recipe["objective"] == "ddpm"``) or a flow-matching
    velocity field (``"flow"``).

    - ddpm: ``t ~ U{0..T-1}``, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, loss ``|eps_hat - eps|^2``
      (Ho et al. 2020, "simple" loss);
    - flow: ``t ~ U[0, 1]``, ``x_t = (1 - t) x0 + t x1`` with ``x0 ~ N(0, I)`` and ``x1`` the digit in
      [-1, 1], loss ``|v_hat - (x1 - x0)|^2`` (conditional flow matching, Lipman et al. 2023).

    AdamW with cosine decay, ``recipe["steps"]`` steps of batch ``recipe["batch_size"]``; the model ends
    with an exponential moving average of the weights (decay ``recipe["ema"]``), rounded to float16
    storage. Returns ``{"train_s", "final_loss", "first_loss", "steps"}`` (losses: mean of the first and
    last tenth of the steps).
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    seed = int(recipe.get("seed", 0))
    seed_everything(seed)
    log = recipe.get("_log")
    rng = np.random.default_rng(seed)
    x = to_model_range(torch.from_numpy(ds.train.inputs["x"]))
    yl = torch.from_numpy(ds.train.targets)
    ab = torch.from_numpy(alpha_bar()).float()
    flow = recipe["objective"] == "flow"
    bs, steps = int(recipe["batch_size"]), int(recipe["steps"])
    opt = torch.optim.AdamW(model.parameters(), lr=float(recipe["lr"]),
                            weight_decay=float(recipe.get("weight_decay", 0)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(recipe.get("ema", 0.999))))
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x), bs))
        x1, y = x[idx], yl[idx]
        noise = torch.randn_like(x1)
        if flow:
            t = torch.rand(bs)
            tt = t[:, None, None, None]
            xt, target = (1 - tt) * noise + tt * x1, x1 - noise
        else:
            t = torch.randint(0, T_STEPS, (bs,))
            a = ab[t][:, None, None, None]
            xt, target = a.sqrt() * x1 + (1 - a).sqrt() * noise, noise
            t = t.float()
        loss = F.mse_loss(model(xt, t, y), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        losses.append(loss.item())
        if log and (step + 1) % 500 == 0:
            log(f"step {step + 1}/{steps} loss {np.mean(losses[-500:]):.4f} ({time.perf_counter() - t0:.0f} s)")
    with torch.no_grad():
        for p, q in zip(model.parameters(), ema.module.parameters()):
            p.copy_(q)
    model.eval()
    round_to_storage(model)
    return _loss_stats(losses, t0)


# ---- representative inputs for calibration, timing and drift ------------------------------------

def _gan_data() -> Dataset:
    ds = D.digits(True)

    def split(part: Split, seed: int) -> Split:
        z = np.random.default_rng(seed).standard_normal((len(part), Z_DIM)).astype(np.float32)
        return Split({"z": z, "y": part.targets.astype(np.int64)}, None)

    return Dataset(split(ds.train, 0), split(ds.test, 1),
                   source="generator inputs: seeded z ~ N(0, I) with the digits' real labels; metric against "
                          "scikit-learn load_digits held-out 25%")


def _noised(kind: str) -> Callable[[], Dataset]:
    def build() -> Dataset:
        ds = D.digits(True)

        def split(part: Split, seed: int) -> Split:
            rng = np.random.default_rng(seed)
            x1 = to_model_range(part.inputs["x"]).astype(np.float64)
            noise = rng.standard_normal(x1.shape)
            if kind == "flow":
                t = rng.random(len(part))
                tt = t[:, None, None, None]
                xt, target = (1 - tt) * noise + tt * x1, x1 - noise
            else:
                t = rng.integers(0, T_STEPS, len(part))
                a = alpha_bar()[t][:, None, None, None]
                xt, target = np.sqrt(a) * x1 + np.sqrt(1 - a) * noise, noise
            return Split({"x": xt.astype(np.float32), "t": t.astype(np.float32), "y": part.targets.astype(np.int64)},
                         target.astype(np.float32))

        what = ("noised at uniform random diffusion steps" if kind == "ddpm"
                else "on the noise-to-data path at uniform t")
        return Dataset(split(ds.train, 0), split(ds.test, 1),
                       source=f"scikit-learn load_digits 8x8, {what} (train: calibration; held-out 25%: timing, "
                              "drift); metric: samples against the held-out digits")

    return build


# ---- specs --------------------------------------------------------------------------------------

GAN_RECIPE = {"arch": {"z_dim": Z_DIM, "ch": 32, "emb": 16}, "steps": 300, "batch_size": 64, "lr": 2e-4,
              "d_lr": 2e-4, "d_ch": 64, "bn_batches": 20, "seed": 0}
DDPM_RECIPE = {"arch": {"ch": 16, "emb": 64}, "objective": "ddpm", "steps": 2000, "batch_size": 128, "lr": 2e-3,
               "weight_decay": 0.0, "ema": 0.999, "seed": 0}
FLOW_RECIPE = {"arch": {"ch": 16, "emb": 64}, "objective": "flow", "steps": 2000, "batch_size": 128, "lr": 2e-3,
               "weight_decay": 0.0, "ema": 0.999, "seed": 0}


def _plan(default_plan: list) -> list:
    """The report's rows: FP32 torch (baseline), FP32 ONNX, INT8 dynamic, INT8 static QDQ (per-channel,
    MinMax calibration on 256 representative training inputs), FP16. Quantize rows whose method the
    default plan left out (``optimize report --methods``) are dropped; an empty default keeps them all."""
    methods = {e[2] for e in default_plan if e[1] == "quantize"}
    return [e for e in _PLAN if e[1] != "quantize" or not default_plan or e[2] in methods]


_PLAN = [("fp32-onnx", "export", "onnx", {}, "fp32-torch"),
         ("int8-dynamic", "quantize", "int8-dynamic", {}, "fp32-onnx"),
         ("int8-static", "quantize", "int8-static", {"calibration": "minmax", "per_channel": True}, "fp32-onnx"),
         ("fp16", "quantize", "fp16", {}, "fp32-onnx")]


def _with_log(fn: Callable[..., dict], name: str) -> Callable[..., dict]:
    """``fn`` with a progress logger (``DEEPSHIP_TRAIN_LOG``) and torch's intra-op threads set to
    ``$DEEPSHIP_THREADS`` (default: all cores) while it runs: small convolutions slow down badly when
    more OpenMP threads than free cores spin on a shared machine."""
    from ..runtimes.session import default_threads

    def train(model, ds, recipe):
        prev = torch.get_num_threads()
        torch.set_num_threads(default_threads())
        try:
            return fn(model, ds, {**recipe, "_log": train_log(name)})
        finally:
            torch.set_num_threads(prev)

    return train


def gan_spec() -> ModelSpec:
    """The ``gan`` zoo entry: the class-conditional DCGAN generator (see the module docstring)."""
    def build(arch: dict | None = None) -> Generator:
        a = {**GAN_RECIPE["arch"], **(arch or {})}
        return Generator(int(a["z_dim"]), int(a["ch"]), int(a["emb"]))

    return ModelSpec(
        name="gan", task="generation", build=build,
        inputs=[TensorSpec("z", ("batch", Z_DIM), "float32", -2.0, 2.0),
                TensorSpec("y", ("batch",), "int64", 0, CLASSES)],
        output_names=["image"], metric=FRECHET, data=_gan_data, train_data=_digits_train,
        recipe=dict(GAN_RECIPE), train=_with_log(train_gan, "gan"),
        evaluate=lambda session: evaluate_samples("gan", session)["frechet"],
        description="class-conditional DCGAN generator (projection discriminator, non-saturating loss), 8x8 digits",
        plan=_plan, measure=_measure("gan"), extra={"kind": "gan"})


def _unet_spec(kind: str, recipe: dict, t_scale: float, t_high: float, out: str, desc: str) -> ModelSpec:
    def build(arch: dict | None = None) -> UNet:
        a = {**recipe["arch"], **(arch or {})}
        return UNet(int(a["ch"]), int(a["emb"]), t_scale=t_scale)

    return ModelSpec(
        name=kind, task="generation", build=build,
        inputs=[TensorSpec("x", ("batch", 1, 8, 8), "float32", -1.5, 1.5),
                TensorSpec("t", ("batch",), "float32", 0.0, t_high),
                TensorSpec("y", ("batch",), "int64", 0, CLASSES)],
        output_names=[out], metric=FRECHET, data=_noised(kind), train_data=_digits_train,
        recipe=dict(recipe), train=_with_log(train_denoiser, kind),
        evaluate=lambda session: evaluate_samples(kind, session)["frechet"],
        description=desc, plan=_plan, measure=_measure(kind), extra={"kind": kind})


def ddpm_spec() -> ModelSpec:
    """The ``ddpm`` zoo entry: the DDPM UNet denoiser (epsilon prediction), sampled with DDIM."""
    return _unet_spec("ddpm", DDPM_RECIPE, 1.0, float(T_STEPS - 1), "eps",
                      f"class-conditional DDPM UNet denoiser (T {T_STEPS}, linear betas), DDIM "
                      f"{DDPM_EVAL_STEPS} steps, 8x8 digits")


def flow_spec() -> ModelSpec:
    """The ``flow`` zoo entry: the flow-matching velocity UNet, sampled with a few ODE steps."""
    return _unet_spec("flow", FLOW_RECIPE, 1000.0, 1.0, "velocity",
                      f"class-conditional flow matching UNet (linear path), {FLOW_EVAL_STEPS} {FLOW_EVAL_METHOD} "
                      "ODE steps, 8x8 digits")
