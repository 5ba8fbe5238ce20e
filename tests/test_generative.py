"""Generative digits models (gan, ddpm, flow): the Frechet distance against closed forms, sampler
errors, the tiny seeded recipes, export with parity at a second shape, INT8 scoring, and trained
models against clear baselines."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deepship import api
from deepship.errors import DeepshipError, InputSpecError
from deepship.models import generative as G
from deepship.models.spec import check_inputs
from deepship.models.train import build_model, train_model, trained_model
from deepship.pipeline.arch import generative as AG
from deepship.runtimes.session import TorchSession

KINDS = ["gan", "ddpm", "flow"]
SPECS = {"gan": G.gan_spec, "ddpm": G.ddpm_spec, "flow": G.flow_spec}


def _session(spec, module):
    return TorchSession(module.eval(), [t.name for t in spec.inputs], spec.output_names, threads=1)


class _Zeros:
    """A session stand-in returning zeros of the input image shape."""

    def run(self, feeds):
        x = feeds.get("x", np.zeros((len(feeds["y"]), 1, 8, 8), np.float32))
        return {"out": np.zeros_like(x)}


# ---- Frechet distance ---------------------------------------------------------------------------

def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert AG.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    # general covariances: the textbook formula with scipy.linalg.sqrtm of the product
    from scipy import linalg

    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert AG.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7)
    assert AG.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert AG.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # singular covariances (dead ReLU units) stay finite and symmetric
    s1[0], s1[:, 0] = 0.0, 0.0
    f = AG.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(f) and f == pytest.approx(AG.frechet_distance(mu2, s2, mu1, s1), rel=1e-6)
    with pytest.raises(InputSpecError, match="covariances"):
        AG.frechet_distance(mu1, s1, mu2[:3], s2)


def test_real_floor_is_far_below_noise():
    floor = AG.real_floor()
    noise = AG.score(np.random.default_rng(0).random((450, 1, 8, 8), dtype=np.float32), AG.eval_labels())
    assert 0 < floor < 0.1 * noise["frechet"]
    assert noise["class_acc"] < 0.3


# ---- samplers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: G.sample_ddpm(_Zeros(), AG.eval_labels(1), steps=0), "positive integer"),
    (lambda: G.sample_ddpm(_Zeros(), AG.eval_labels(1), steps=-3), "positive integer"),
    (lambda: G.sample_ddpm(_Zeros(), AG.eval_labels(1), steps=2.5), "positive integer"),
    (lambda: G.sample_ddpm(_Zeros(), AG.eval_labels(1), steps=G.T_STEPS + 1), "at most 1000"),
    (lambda: G.sample_ddpm(_Zeros(), AG.eval_labels(1), steps=5, eta=-1.0), "eta"),
    (lambda: G.sample_flow(_Zeros(), AG.eval_labels(1), steps=0), "positive integer"),
    (lambda: G.sample_flow(_Zeros(), AG.eval_labels(1), steps=4, method="rk4"), "euler or midpoint"),
    (lambda: G.sample_gan(_Zeros(), np.array([3, 10])), "0..9"),
    (lambda: G.sample_flow(_Zeros(), np.zeros((2, 2), np.int64)), "1-D integer"),
    (lambda: G.sample_gan(_Zeros(), np.array([0.5, 1.0])), "1-D integer"),
    (lambda: AG.sample("vae", _Zeros(), AG.eval_labels(1)), "unknown generative model"),
])
def test_sampler_errors_are_one_line(call, match):
    with pytest.raises(InputSpecError, match=match) as e:
        call()
    assert isinstance(e.value, DeepshipError) and "\n" not in str(e.value)


def test_samplers_shapes_range_and_seeds():
    y = AG.eval_labels(2)
    for fn in (lambda s: G.sample_ddpm(_Zeros(), y, steps=3, seed=s, eta=1.0),
               lambda s: G.sample_flow(_Zeros(), y, steps=2, seed=s, method="midpoint")):
        a, b, c = fn(0), fn(0), fn(1)
        assert a.shape == (20, 1, 8, 8) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
        assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert list(G.ddim_timesteps(4)) == [999, 666, 333, 0]


# ---- recipes ------------------------------------------------------------------------------------

TINY = {"gan": {"arch": {"ch": 8, "emb": 4}, "d_ch": 8, "steps": 40, "batch_size": 32, "lr": 1e-3, "d_lr": 1e-3,
                "bn_batches": 2},
        "ddpm": {"arch": {"ch": 8, "emb": 16}, "steps": 40, "batch_size": 16, "lr": 3e-3},
        "flow": {"arch": {"ch": 8, "emb": 16}, "steps": 40, "batch_size": 16, "lr": 3e-3}}


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_recipe_is_seeded_and_learns(kind):
    spec = SPECS[kind]()
    tiny = {**spec.recipe, **TINY[kind]}
    model, stats = train_model(spec, tiny)
    model2, _ = train_model(spec, tiny)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert stats["steps"] == 40 and np.isfinite(stats["final_loss"])
    # learns: the denoisers' regression loss and the discriminator's loss fall (the discriminator
    # starts at log 4 = 1.386 and separates real from generated digits first)
    assert stats["final_loss"] < 0.8 * stats["first_loss"]
    # the stored weights are float16, and the trained module holds exactly those values
    sd = model.state_dict()
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    p = next(model.parameters())
    assert torch.equal(p, p.half().float())


# ---- committed models: export, INT8, quality ------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_committed_model_exports_and_int8_is_scored(zoo_ctx, kind):
    ctx = zoo_ctx(kind)
    v = api.export(ctx)
    p = v.info["parity"]
    assert p["ok"] and p["second_shape"]["shape"][ctx.spec.inputs[0].name][0] == 3
    assert p["second_shape"]["max_abs"] < 1e-3
    assert all(d == {0: "batch"} or d == {"0": "batch"} for d in v.info["dynamic_dims"].values())
    q = api.quantize(ctx, "int8-static")
    assert q.info["nodes"]["quantized"]
    sess = ctx.session(q, threads=1)
    r = AG.evaluate_samples(kind, sess, steps=None if kind == "gan" else 5, per_class=10)
    assert np.isfinite(r["frechet"]) and r["frechet"] > 0 and 0 <= r["class_acc"] <= 1
    # the representative data fits the graph (INT8 calibration and timing inputs)
    ds = ctx.dataset()
    check_inputs(ctx.spec.inputs, {k: v[:4] for k, v in ds.train.inputs.items()})
    out = sess.run({k: v[:5] for k, v in ds.test.inputs.items()})
    assert next(iter(out.values())).shape[0] == 5


@pytest.mark.parametrize("kind", KINDS)
def test_trained_model_beats_untrained_and_is_conditional(kind):
    spec = SPECS[kind]()
    model, info = trained_model(spec)
    steps = {"gan": None, "ddpm": 10, "flow": 4}[kind]
    trained = AG.evaluate_samples(kind, _session(spec, model), steps=steps, per_class=20)
    torch.manual_seed(0)
    untrained = AG.evaluate_samples(kind, _session(spec, build_model(spec)), steps=steps, per_class=20)
    assert trained["frechet"] < 0.25 * untrained["frechet"]
    assert trained["class_acc"] > 0.7  # chance is 0.1
    assert trained["frechet"] > AG.real_floor() * 0.5  # sanity: not below what real digits get
