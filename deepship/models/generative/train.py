"""The generative models' seeded recipes: the GAN (non-saturating loss, projection discriminator)
and the UNet denoisers (DDPM epsilon prediction, flow matching velocity), with EMA weights."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...utils import default_threads
from ..spec import Dataset
from ..train import round_to_storage, seed_everything, train_log
from .model import CLASSES, T_STEPS, Z_DIM, Discriminator, Generator, UNet, alpha_bar, to_model_range


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


GAN_RECIPE = {"arch": {"z_dim": Z_DIM, "ch": 32, "emb": 16}, "steps": 300, "batch_size": 64, "lr": 2e-4,
              "d_lr": 2e-4, "d_ch": 64, "bn_batches": 20, "seed": 0}
DDPM_RECIPE = {"arch": {"ch": 16, "emb": 64}, "objective": "ddpm", "steps": 2000, "batch_size": 128, "lr": 2e-3,
               "weight_decay": 0.0, "ema": 0.999, "seed": 0}
FLOW_RECIPE = {"arch": {"ch": 16, "emb": 64}, "objective": "flow", "steps": 2000, "batch_size": 128, "lr": 2e-3,
               "weight_decay": 0.0, "ema": 0.999, "seed": 0}


def with_log(fn: Callable[..., dict], name: str) -> Callable[..., dict]:
    """``fn`` with a progress logger (``DEEPSHIP_TRAIN_LOG``) and torch's intra-op threads set to
    ``$DEEPSHIP_THREADS`` (default: all cores) while it runs: small convolutions slow down badly when
    more OpenMP threads than free cores spin on a shared machine."""
    def train(model, ds, recipe):
        prev = torch.get_num_threads()
        torch.set_num_threads(default_threads())
        try:
            return fn(model, ds, {**recipe, "_log": train_log(name)})
        finally:
            torch.set_num_threads(prev)

    return train
