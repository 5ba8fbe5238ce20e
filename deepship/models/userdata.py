"""Your data: ``.npz`` files for evaluation (``--data``), fine-tuning (``--train-data``) and calibration
(``--calibration-data``), read with NumPy (``allow_pickle=False``: nothing is unpickled).

Layouts accepted (the arrays used are reported back, :func:`describe`):

- inputs: one array per input name (``x``, ``input_ids``, ...); for a single-input model also
  ``inputs``, ``x`` or ``X``; first axis = sample;
- targets (optional for evaluation and calibration, required for training): ``targets``, ``labels``
  or ``y``. Integer targets mean classification (metric accuracy, cross-entropy), float targets
  regression (MSE).

Splits (:func:`attach_data`): evaluation runs on ``--data``. Calibration uses ``--calibration-data``;
without it the training data (``--train-data``); without either, a seeded hold-out of ``--data``
(``min(256, n // 4)`` samples) that the evaluation then leaves out, so the two never overlap. Every file
is checked before any work: shapes and dtypes against the model's inputs (float64 -> float32 and int32
-> int64 are cast), equal sample counts, and no NaN or Inf.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import DataError, InputSpecError
from ..utils import sha256_file
from .spec import METRICS, Dataset, Metric, ModelSpec, Split
from .train import USER_RECIPE, fit_supervised

INPUT_KEYS_SINGLE = ("inputs", "x", "X")
TARGET_KEYS = ("targets", "labels", "y")
#: most samples of ``--data`` held out for calibration when no calibration or training file is given
CALIBRATION_HOLDOUT = 256
_CASTS = {(np.float64, np.float32), (np.float16, np.float32), (np.int32, np.int64), (np.int16, np.int64),
          (np.uint8, np.int64), (np.int64, np.int32)}


@dataclass
class NpzData:
    """Arrays read from one ``.npz``: ``inputs`` (input name -> array), ``targets`` (or ``None``), the
    array each came from (``used``), the sample count and the file."""

    path: Path
    inputs: dict[str, np.ndarray]
    targets: np.ndarray | None
    used: dict[str, str]
    n: int

    def describe(self, role: str) -> str:
        """One line: ``data.npz (--data): 10,000 samples; x <- 'images', targets <- 'labels'``."""
        cols = ", ".join(f"{k} <- '{v}'" for k, v in self.used.items())
        return f"{self.path.name} ({role}): {self.n:,} samples; {cols}"


def _finite(name: str, path: Path, a: np.ndarray) -> None:
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"array '{name}' of {path} holds NaN or Inf (first at index {idx}); clean or drop those "
                            "samples")


def read_npz(path: str | Path, spec: ModelSpec, role: str, need_targets: bool = False) -> NpzData:
    """Read and check one ``.npz`` for ``spec`` (see the module docstring for the layouts).

    Args:
        role: the option that named the file (``--data``, ``--train-data``, ``--calibration-data``), for messages.
        need_targets: refuse a file without ``targets``/``labels``/``y``.

    Raises:
        DataError: missing or unreadable file, no array for an input, arrays that do not fit the
            model's inputs or each other, NaN/Inf, or missing targets when they are needed.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{role} file {p} not found; give an .npz with one array per input (and 'targets')")
    try:
        with np.load(str(p), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"cannot read {role} file {p} as .npz ({type(e).__name__}); save it with numpy.savez") from None
    names = [t.name for t in spec.inputs]
    used: dict[str, str] = {}
    for t in spec.inputs:
        if t.name in arrays:
            used[t.name] = t.name
        elif len(names) == 1 and (alt := next((k for k in INPUT_KEYS_SINGLE if k in arrays), None)):
            used[t.name] = alt
        else:
            want = f"'{t.name}'" + (f" (or {', '.join(repr(k) for k in INPUT_KEYS_SINGLE)})" if len(names) == 1 else "")
            raise DataError(f"{role} file {p} has no array {want}; it holds {', '.join(sorted(arrays)) or 'nothing'}, "
                            f"the model takes {', '.join(t.describe() for t in spec.inputs)}")
    tkey = next((k for k in TARGET_KEYS if k in arrays and k not in used.values()), None)
    if need_targets and tkey is None:
        raise DataError(f"{role} file {p} has no targets; add an array 'targets' (or 'labels' / 'y') with one label "
                        "per sample")
    inputs = {}
    for t in spec.inputs:
        a = arrays[used[t.name]]
        if a.ndim == 0:
            raise DataError(f"{role} file {p}, array '{used[t.name]}' is a single value; give one row per sample")
        want = np.dtype(t.dtype)
        if a.dtype != want and (a.dtype.type, want.type) in _CASTS:
            a = a.astype(want)
        try:
            t.check(a[:1] if t.dims and t.dims[0] == "batch" else a)
        except InputSpecError as e:
            raise DataError(f"{role} file {p}, array '{used[t.name]}': {e}") from None
        _finite(used[t.name], p, a)
        inputs[t.name] = np.ascontiguousarray(a)
    targets = arrays[tkey] if tkey else None
    if targets is not None and targets.ndim == 0:
        raise DataError(f"{role} file {p}, array '{tkey}' is a single value; give one target per sample")
    if targets is not None:
        _finite(tkey, p, targets)
        used["targets"] = tkey
    lengths = {used[k]: len(v) for k, v in inputs.items()} | ({tkey: len(targets)} if targets is not None else {})
    if len(set(lengths.values())) > 1:
        raise DataError(f"{role} file {p}: arrays have different sample counts ({lengths}); give one row per sample in each")
    n = next(iter(lengths.values()))
    if n == 0:
        raise DataError(f"{role} file {p} holds no samples; give at least one")
    return NpzData(p, inputs, targets, used, n)


def npz_identity(*parts: tuple[str, str | None]) -> str:
    """Identity of the attached files for the cache key: each role's file SHA-256, and the split rule."""
    return "npz-v2:" + ";".join(f"{role}={sha256_file(f)[:16] if f else '-'}" for role, f in parts) + \
        f";holdout={CALIBRATION_HOLDOUT}"


def _metric_for(targets: np.ndarray, metric: str | None) -> Metric:
    if metric:
        return METRICS[metric]
    return METRICS["accuracy"] if np.issubdtype(targets.dtype, np.integer) else METRICS["mse"]


def attach_data(spec: ModelSpec, data: str | None = None, metric: str | None = None,
                evaluate: Callable[[Any], float] | None = None, higher_is_better: bool | None = None,
                train_data: str | None = None, calibration_data: str | None = None) -> ModelSpec:
    """Return ``spec`` with user data, metric and/or evaluation function attached (see the module docstring).

    ``train_data`` (labeled) also gives a model without a recipe the generic supervised recipe
    (:func:`deepship.models.train.fit_supervised`), so prune and distill can fine-tune it. Without an
    explicit metric, integer targets choose ``accuracy`` and float targets ``mse``. The lines of
    ``spec.extra["data_notes"]`` say which arrays were used and how the data was split.

    Raises:
        DataError: unknown metric name, bad files, or ``--metric`` without labeled data.
    """
    if metric and metric not in METRICS:
        raise DataError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")
    kw: dict[str, Any] = {}
    notes: list[str] = []
    ev = read_npz(data, spec, "--data") if data else None
    tr = read_npz(train_data, spec, "--train-data", need_targets=True) if train_data else None
    ca = read_npz(calibration_data, spec, "--calibration-data") if calibration_data else None
    if metric and (ev is None or ev.targets is None):
        raise DataError(f"--metric {metric} needs labeled data; pass --data FILE.npz with 'targets'")
    if ev is not None or tr is not None or ca is not None:
        if ev is None:
            raise DataError("--train-data / --calibration-data need --data FILE.npz too: the held-out samples to evaluate on")
        test = Split(ev.inputs, ev.targets)
        notes.append(ev.describe("--data"))
        calib, calib_src = None, ""
        if ca is not None:
            calib, calib_src = Split(ca.inputs), f"samples of {ca.path.name} (--calibration-data)"
            notes.append(ca.describe("--calibration-data"))
        if tr is not None:
            train = Split(tr.inputs, tr.targets)
            notes.append(tr.describe("--train-data"))
            if calib is None:
                calib, calib_src = train, f"samples of {tr.path.name} (--train-data)"
        elif calib is None:  # hold out part of --data for calibration; evaluate on the rest
            k = min(CALIBRATION_HOLDOUT, ev.n // 4)
            if k >= 1:
                idx = np.random.default_rng(0).permutation(ev.n)
                hold, keep = np.sort(idx[:k]), np.sort(idx[k:])
                calib = test.take(hold)
                test = test.take(keep)
                calib_src = f"samples of {ev.path.name} held out from evaluation (no --calibration-data)"
                notes.append(f"calibration: {k} samples of {ev.path.name} held out; evaluation on the other {len(keep):,}")
            else:
                calib, calib_src = test, f"samples of {ev.path.name}, the evaluation data too ({ev.n} samples: too few to split)"
                notes.append(f"calibration: {ev.path.name} has {ev.n} samples, too few to hold any out: "
                             "calibration and evaluation share them")
        train = train if tr is not None else Split(calib.inputs)  # unlabeled: nothing to fine-tune on
        src = f"user data {ev.path.name} ({len(test):,} evaluation samples)"
        ds = Dataset(train, test, source=src, calibration=calib, calibration_source=calib_src)
        kw.update(data=lambda: ds, data_id=npz_identity(("data", data), ("train", train_data),
                                                        ("calibration", calibration_data)))
        if ev.targets is not None:
            m = _metric_for(ev.targets, metric)
            kw.update(metric=m, task="classification" if m.name == "accuracy" else "regression")
        else:
            notes.append(f"{ev.path.name} has no 'targets'/'labels'/'y' array: the report shows output drift against "
                         "FP32 only (no metric)")
        if tr is not None and spec.recipe is None:
            kw.update(train=fit_supervised, recipe=dict(USER_RECIPE))
    if evaluate is not None:
        kw["evaluate"] = evaluate
        kw["metric"] = Metric(getattr(evaluate, "__name__", "score"),
                              True if higher_is_better is None else higher_is_better, lambda p, y: float("nan"))
    if notes:
        kw["extra"] = {**spec.extra, "data_notes": notes}
    return spec.replace(**kw)
