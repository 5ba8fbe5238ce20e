"""The generative models' data: scikit-learn's 8x8 digits (the vision family's split) and representative
network inputs for calibration, timing and drift (noised digits at random steps; latent codes)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..spec import Dataset, Split
from ..vision.data import digits
from .model import T_STEPS, Z_DIM, alpha_bar, to_model_range


def digits_train() -> Dataset:
    return digits(True)


def gan_data() -> Dataset:
    ds = digits(True)

    def split(part: Split, seed: int) -> Split:
        z = np.random.default_rng(seed).standard_normal((len(part), Z_DIM)).astype(np.float32)
        return Split({"z": z, "y": part.targets.astype(np.int64)}, None)

    return Dataset(split(ds.train, 0), split(ds.test, 1),
                   source="generator inputs: seeded z ~ N(0, I) with the digits' real labels; metric against "
                          "scikit-learn load_digits held-out 25%")


def noised(kind: str) -> Callable[[], Dataset]:
    def build() -> Dataset:
        ds = digits(True)

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
