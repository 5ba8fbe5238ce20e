"""Generative family: class-conditional generative models on scikit-learn's 8x8 digits: a GAN, a DDPM and flow matching.

| zoo name | method | deployed graph | sampler |
|---|---|---|---|
| ``gan`` | DCGAN-style generator (Radford et al. 2016, arXiv:1511.06434), non-saturating loss (Goodfellow et al. 2014), projection discriminator with spectral norm (Miyato & Koyama 2018, arXiv:1802.05637; Miyato et al. 2018, arXiv:1802.05957) | generator ``(z, y) -> image`` | one network call |
| ``ddpm`` | DDPM (Ho et al. 2020, arXiv:2006.11239): epsilon prediction, linear beta schedule, T = 1000 | UNet denoiser ``(x, t, y) -> eps`` | DDIM (Song et al. 2021, arXiv:2010.02502), eta 0, few steps |
| ``flow`` | flow matching (Lipman et al. 2023, arXiv:2210.02747) on the linear (rectified / OT) path ``x_t = (1 - t) x0 + t x1`` | same UNet family ``(x, t, y) -> velocity`` | Euler or midpoint ODE steps |

All three are class-conditional (labels 0..9, ``int64``), trained on the 1,347 training digits only
(:func:`deepship.models.vision.data.digits`), seeded, and take 1-3 minutes on 2 CPU cores.

Exported graph contracts (dynamic dim ``batch``):

- ``gan``: ``z: float32[batch, 32]`` (standard normal), ``y: int64[batch]`` -> ``image: float32[batch, 1, 8, 8]``
  in [0, 1] (the digits' pixel scale: ink / 16).
- ``ddpm``: ``x: float32[batch, 1, 8, 8]`` (noised sample, pixels scaled to [-1, 1]: ``2 * p - 1``),
  ``t: float32[batch]`` (diffusion step index in [0, 1000)), ``y: int64[batch]`` -> ``eps: float32[batch, 1, 8, 8]``
  (predicted unit-variance noise).
- ``flow``: ``x: float32[batch, 1, 8, 8]`` (point on the path; ``x0`` noise at ``t = 0``, data in [-1, 1] at
  ``t = 1``), ``t: float32[batch]`` in [0, 1], ``y: int64[batch]`` -> ``velocity: float32[batch, 1, 8, 8]``.

The metric (:data:`FRECHET`, lower is better; computed by the family adapter,
:mod:`deepship.pipeline.arch.generative`) is the FID formula (Heusel et al. 2017, arXiv:1706.08500)
on the features of the zoo's trained ``cnn`` (LeNet, penultimate 128-d fc layer after ReLU) instead of
Inception features: 450 generated digits (45 per class, fixed seeds), sampled through the variant's own
session, against the 450 held-out real digits. Because the samplers call ``session.run``, every
variant (torch, FP32 ONNX, INT8, FP16) is evaluated on its own outputs. The report's notes add the
``cnn`` classifier's accuracy on the conditional samples, the Frechet distance against the number of
sampling steps (``ddpm``, ``flow``) and the real-vs-real floor (450 training digits against the
held-out digits).
"""
from __future__ import annotations

from ..spec import ModelSpec, TensorSpec
from .data import digits_train, gan_data, noised
from .model import (CLASSES, DDPM_EVAL_STEPS, DDPM_STEP_SWEEP, EVAL_PER_CLASS, FLOW_EVAL_METHOD, FLOW_EVAL_STEPS,  # noqa: F401
                    FLOW_STEP_SWEEP, FRECHET, T_STEPS, Z_DIM, Discriminator, Generator, ResBlock, UNet, alpha_bar,
                    ddim_timesteps, sample_ddpm, sample_flow, sample_gan, timestep_embedding, to_model_range,
                    to_pixels)
from .train import DDPM_RECIPE, FLOW_RECIPE, GAN_RECIPE, train_denoiser, train_gan, with_log


def gan_spec() -> ModelSpec:
    """The ``gan`` zoo entry: the class-conditional DCGAN generator (see the module docstring)."""
    def build(arch: dict | None = None) -> Generator:
        a = {**GAN_RECIPE["arch"], **(arch or {})}
        return Generator(int(a["z_dim"]), int(a["ch"]), int(a["emb"]))

    return ModelSpec(
        name="gan", task="generation", build=build,
        inputs=[TensorSpec("z", ("batch", Z_DIM), "float32", -2.0, 2.0),
                TensorSpec("y", ("batch",), "int64", 0, CLASSES)],
        output_names=["image"], metric=FRECHET, data=gan_data, train_data=digits_train, family="generative",
        recipe=dict(GAN_RECIPE), train=with_log(train_gan, "gan"),
        description="class-conditional DCGAN generator (projection discriminator, non-saturating loss), 8x8 digits",
        extra={"kind": "gan"})


def _unet_spec(kind: str, recipe: dict, t_scale: float, t_high: float, out: str, desc: str) -> ModelSpec:
    def build(arch: dict | None = None) -> UNet:
        a = {**recipe["arch"], **(arch or {})}
        return UNet(int(a["ch"]), int(a["emb"]), t_scale=t_scale)

    return ModelSpec(
        name=kind, task="generation", build=build,
        inputs=[TensorSpec("x", ("batch", 1, 8, 8), "float32", -1.5, 1.5),
                TensorSpec("t", ("batch",), "float32", 0.0, t_high),
                TensorSpec("y", ("batch",), "int64", 0, CLASSES)],
        output_names=[out], metric=FRECHET, data=noised(kind), train_data=digits_train, family="generative",
        recipe=dict(recipe), train=with_log(train_denoiser, kind), description=desc, extra={"kind": kind})


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


#: the zoo entries of this family (read by :mod:`deepship.models.zoo`)
SPECS = {"gan": gan_spec, "ddpm": ddpm_spec, "flow": flow_spec}

