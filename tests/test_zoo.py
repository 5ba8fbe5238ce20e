"""Each training recipe runs on a tiny configuration; committed weights match their recipes; data is real."""
import numpy as np
import pytest
import torch

from deepship.models.rnn import data as RD
from deepship.models.train import (
    PACKAGED_WEIGHTS,
    _metadata_matches,
    load_weights,
    recipe_hash,
    save_weights,
    train_model,
    trained_model,
)
from deepship.models.vision import data as VD
from deepship.models.zoo import ZOO


def test_digits_split_is_held_out_and_real():
    ds = VD.digits(image=True)
    assert ds.train.inputs["x"].shape[1:] == (1, 8, 8) and ds.test.inputs["x"].dtype == np.float32
    assert len(ds.train) + len(ds.test) == 1797
    assert set(np.unique(ds.test.targets)) == set(range(10))
    assert 0.0 <= ds.train.inputs["x"].min() and ds.train.inputs["x"].max() <= 1.0


def test_sunspots_last_years_held_out():
    ds = RD.sunspots()
    s = RD.sunspots_series()
    assert len(ds.test) == RD.SUNSPOTS_TEST_YEARS
    # the last test target is the last year of the series; no training target comes from the test years
    assert ds.test.targets[-1, 0] == pytest.approx(s[-1])
    assert ds.train.targets[-1, 0] == pytest.approx(s[-RD.SUNSPOTS_TEST_YEARS - 1])


CLASSIC = ["mlp", "cnn", "lstm", "gru"]  # the GPT's tiny recipe is exercised in test_gpt.py


@pytest.mark.parametrize("name", CLASSIC)
def test_training_recipe_runs_tiny_and_learns(name):
    spec = ZOO[name]()
    tiny = {**spec.recipe, "epochs": 3}
    if "hidden" in tiny["arch"] and isinstance(tiny["arch"]["hidden"], int):
        tiny["arch"] = {**tiny["arch"], "hidden": 16}
    ds = spec.data()
    model, stats = train_model(spec, tiny)
    assert stats["train_s"] > 0 and np.isfinite(stats["final_loss"])
    with torch.no_grad():
        pred = model(torch.from_numpy(ds.test.inputs["x"])).numpy()
    score = spec.metric.fn(pred, ds.test.targets)
    assert np.isfinite(score)
    if spec.metric.name == "accuracy":
        assert score > 0.3  # well above chance (0.1) after 3 epochs
    # seeded: the same tiny recipe gives the same weights
    model2, _ = train_model(spec, tiny)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(ZOO))
def test_committed_weights_match_recipe_and_are_small(name):
    """Every zoo model starts from committed weights (CI would otherwise run the full recipes), except
    pretrained models, whose weights come from an installed package."""
    spec = ZOO[name]()
    if spec.recipe is None:
        assert spec.source == "hf" and spec.extra.get("identity"), f"{name} has neither a recipe nor a pretrained source"
        return
    p = PACKAGED_WEIGHTS / f"{name}.safetensors"
    assert p.is_file() and p.stat().st_size < 5 * 2**20
    assert _metadata_matches(p, recipe_hash(spec)), f"re-run: optimize train {name} --out deepship/models/weights"
    model, info = trained_model(spec)
    assert info["origin"] == "packaged"


def test_changed_recipe_is_not_served_from_committed_weights(monkeypatch):
    spec = ZOO["mlp"]()
    spec = spec.replace(recipe={**spec.recipe, "epochs": 1})
    assert not _metadata_matches(PACKAGED_WEIGHTS / "mlp.safetensors", recipe_hash(spec))
    model, info = trained_model(spec)
    assert info["origin"] == "trained"
    model, info = trained_model(spec)
    assert info["origin"] == "cache"


def test_weights_roundtrip_safetensors_and_checkpoint(tmp_path):
    spec = ZOO["mlp"]()
    model, _ = trained_model(spec)
    st = save_weights(model, tmp_path / "w.safetensors")
    pt = tmp_path / "w.pt"
    torch.save(model.state_dict(), pt)
    for path in (st, pt):
        m = load_weights(spec.build(), path)
        for a, b in zip(m.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)


def test_arima_reference_is_computed():
    b = RD.arima_baseline()
    assert b["metric"] == "mae" and 0 < b["value"] < 100
