"""The digits data: scikit-learn's 8x8 handwritten digits (installed with scikit-learn; nothing is
downloaded at run time)."""
from __future__ import annotations

import functools

import numpy as np

from ..spec import Dataset, Split

DIGITS_TEST_FRACTION = 0.25


@functools.lru_cache(maxsize=4)
def digits(image: bool) -> Dataset:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], stratified 75/25 split (seed 0).

    Returns:
        ``Dataset`` with ``inputs["x"]`` float32 ``(N, 64)`` or ``(N, 1, 8, 8)`` if ``image``,
        and int64 targets ``(N,)`` in 0..9. Train 1,347 samples, test 450.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=DIGITS_TEST_FRACTION, random_state=0, stratify=y)
    if image:
        xtr, xte = xtr.reshape(-1, 1, 8, 8), xte.reshape(-1, 1, 8, 8)
    return Dataset(Split({"x": xtr}, ytr), Split({"x": xte}, yte),
                   source="scikit-learn load_digits (UCI 8x8 handwritten digits), 25% stratified held out")
