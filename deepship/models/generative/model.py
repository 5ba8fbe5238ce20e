"""The generative networks, the DDPM schedule and the samplers (torch + numpy; a sampler drives any
session-like object with ``run(feeds) -> outputs``); see :mod:`deepship.models.generative`."""
from __future__ import annotations

import functools
import math
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import InputSpecError
from ..spec import Metric
from ..train import fp16_storage

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
