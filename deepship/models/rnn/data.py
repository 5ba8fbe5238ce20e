"""The sunspots data: statsmodels' yearly mean sunspot numbers 1700-2008 (installed with statsmodels;
nothing is downloaded at run time), and the ARIMA reference."""
from __future__ import annotations

import functools

import numpy as np

from ..spec import Dataset, Split

SUNSPOTS_WINDOW = 24
SUNSPOTS_TEST_YEARS = 40


@functools.lru_cache(maxsize=1)
def sunspots_series() -> np.ndarray:
    """The yearly sunspot numbers 1700-2008 from statsmodels, float64 ``(309,)``."""
    import statsmodels.api as sm

    return sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(np.float64)


@functools.lru_cache(maxsize=1)
def sunspots() -> Dataset:
    """One-step-ahead forecasting windows over the sunspot series.

    Each sample is the previous ``SUNSPOTS_WINDOW`` (24) years, float32 ``(24, 1)``; the target is the
    next year's value, float32 ``(1,)``. The last ``SUNSPOTS_TEST_YEARS`` (40) targets (1969-2008) are
    held out; training windows have targets before that.
    """
    s = sunspots_series().astype(np.float32)
    w = SUNSPOTS_WINDOW
    xs = np.stack([s[i:i + w] for i in range(len(s) - w)])[:, :, None]
    ys = s[w:][:, None]
    n_test = SUNSPOTS_TEST_YEARS
    return Dataset(Split({"x": xs[:-n_test]}, ys[:-n_test]), Split({"x": xs[-n_test:]}, ys[-n_test:]),
                   source=f"statsmodels sunspots 1700-2008, last {n_test} years held out")


def sunspots_train_stats() -> tuple[float, float]:
    """Mean and std of the training part of the series (used to normalize inside the model)."""
    s = sunspots_series()
    train = s[: len(s) - SUNSPOTS_TEST_YEARS]
    return float(train.mean()), float(train.std())


def arima_baseline(order: tuple[int, int, int] = (9, 0, 1)) -> dict:
    """Classical reference: statsmodels ARIMA fitted on the training years, one-step-ahead forecasts
    over the held-out years with the fitted parameters (no refit).

    Returns:
        ``{"name": "ARIMA(9,0,1)", "metric": "mae", "value": float, "source": ...}``.
    """
    import warnings

    from statsmodels.tsa.arima.model import ARIMA

    s = sunspots_series()
    n_test = SUNSPOTS_TEST_YEARS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ARIMA(s[:-n_test], order=order).fit()
        full = res.apply(s)
        pred = full.get_prediction(start=len(s) - n_test).predicted_mean
    mae = float(np.abs(np.asarray(pred) - s[-n_test:]).mean())
    return {"name": f"ARIMA{order}".replace(" ", ""), "metric": "mae", "value": mae,
            "source": "statsmodels.tsa.arima.model.ARIMA, fitted on training years, one-step-ahead"}
