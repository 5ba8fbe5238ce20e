"""The ``ModelSpec``: everything the pipeline needs to know about one architecture.

A spec says how to build the ``torch.nn.Module``, which inputs it takes (names, dims with the
dynamic ones named, dtypes), the real data it trains and evaluates on, its metric (with its
direction), and a small seeded training recipe. Zoo models and the user's own models both become
a :class:`ModelSpec`; the pipeline never looks at anything else.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import InputSpecError

#: Sizes used for named dynamic dims in the example inputs (export) ...
EXAMPLE_DIM_SIZES = {"batch": 2, "seq": 16, "sequence": 16, "time": 16, "past": 8}
#: ... and the different sizes used for the parity check at a second shape.
SECOND_DIM_SIZES = {"batch": 3, "seq": 23, "sequence": 23, "time": 23, "past": 11}

_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
           "bool": np.bool_, "uint8": np.uint8, "int8": np.int8, "float64": np.float64}


@dataclass(frozen=True)
class TensorSpec:
    """One model input.

    Attributes:
        name: input name (also the ONNX input name and ``forward()`` argument name).
        dims: per dim, an ``int`` (static) or a ``str`` naming a dynamic dim (``"batch"``, ``"seq"``).
        dtype: numpy dtype name, e.g. ``"float32"`` or ``"int64"``.
        low, high: value range for random example inputs (ints: ``[low, high)``).
    """

    name: str
    dims: tuple[int | str, ...]
    dtype: str = "float32"
    low: float = 0.0
    high: float = 1.0

    @property
    def dynamic_dims(self) -> dict[int, str]:
        """``{axis: dim name}`` for the dynamic axes."""
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def shape(self, sizes: Mapping[str, int] | None = None) -> tuple[int, ...]:
        """Concrete shape, named dims taken from ``sizes`` (default :data:`EXAMPLE_DIM_SIZES`, else 4)."""
        sizes = {**EXAMPLE_DIM_SIZES, **(sizes or {})}
        return tuple(d if isinstance(d, int) else int(sizes.get(d, 4)) for d in self.dims)

    def random(self, sizes: Mapping[str, int] | None = None, seed: int = 0) -> np.ndarray:
        """A seeded random array of this spec's dtype at ``shape(sizes)``."""
        rng = np.random.default_rng(seed)
        shp = self.shape(sizes)
        dt = np.dtype(_DTYPES.get(self.dtype, self.dtype))
        if np.issubdtype(dt, np.integer):
            return rng.integers(int(self.low), max(int(self.high), int(self.low) + 1), size=shp).astype(dt)
        if dt == np.bool_:
            return np.ones(shp, dtype=dt)
        return (rng.random(shp) * (self.high - self.low) + self.low).astype(dt)

    def check(self, arr: np.ndarray) -> None:
        """Raise :class:`InputSpecError` if ``arr`` does not fit this spec (rank, static dims, dtype)."""
        if arr.ndim != len(self.dims):
            raise InputSpecError(
                f"input '{self.name}' has rank {arr.ndim} (shape {tuple(arr.shape)}), expected {self.describe()}")
        for i, (d, n) in enumerate(zip(self.dims, arr.shape)):
            if isinstance(d, int) and d != n:
                raise InputSpecError(
                    f"input '{self.name}' has size {n} at axis {i}, expected {d}: shape {tuple(arr.shape)} "
                    f"does not match {self.describe()}")
        if np.dtype(arr.dtype) != np.dtype(_DTYPES.get(self.dtype, self.dtype)):
            raise InputSpecError(f"input '{self.name}' has dtype {arr.dtype}, expected {self.dtype}")

    def describe(self) -> str:
        """The spec in the CLI's notation, e.g. ``x:float32[batch,1,8,8]``."""
        return f"{self.name}:{self.dtype}[{','.join(str(d) for d in self.dims)}]"


_SPEC_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*:\s*([a-z0-9]+)\s*\[([^\]]*)\]\s*$")


def parse_input_spec(text: str) -> TensorSpec:
    """Parse ``NAME:DTYPE[d0,d1,...]``; an int dim is static, a word names a dynamic dim.

    Example: ``x:float32[batch,1,28,28]``, ``input_ids:int64[batch,seq]``.

    Raises:
        InputSpecError: the text does not follow that notation, or names an unknown dtype.
    """
    m = _SPEC_RE.match(text)
    if not m:
        raise InputSpecError(f"cannot parse input spec '{text}'; write NAME:DTYPE[dims], e.g. x:float32[batch,3,32,32]")
    name, dtype, dims_s = m.groups()
    if dtype not in _DTYPES:
        raise InputSpecError(f"unknown dtype '{dtype}' in input spec '{text}'; use one of {', '.join(_DTYPES)}")
    dims: list[int | str] = []
    for d in (x.strip() for x in dims_s.split(",") if x.strip()):
        if d.isdigit():
            dims.append(int(d))
        elif re.match(r"^[A-Za-z_]\w*$", d):
            dims.append(d)
        else:
            raise InputSpecError(f"bad dim '{d}' in input spec '{text}'; a dim is an integer or a name such as batch")
    return TensorSpec(name, tuple(dims), dtype)


class ArchConfig:
    """Base of the zoo's frozen-dataclass architecture configs (``GPTConfig``, ``ASRConfig``): the
    dict form stored in a spec's ``extra["config"]`` and in recipes."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None):
        """The config from a dict; keys that are not fields are ignored."""
        fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in (d or {}).items() if k in fields})


@dataclass(frozen=True)
class Metric:
    """A task metric.

    Attributes:
        name: e.g. ``"accuracy"`` (fraction in [0, 1], reported as %) or ``"mae"``.
        higher_is_better: direction, used by the report's change column and the CI gate.
        fn: ``fn(predictions: np.ndarray, targets: np.ndarray) -> float``. Predictions are the
            model's first output over the whole held-out split. ``None`` for a metric that only the
            spec's ``evaluate`` can compute (e.g. CER, which streams whole utterances).
        unit: display unit (``"%"`` for accuracy shown as percentage points).
    """

    name: str
    higher_is_better: bool
    fn: Callable[[np.ndarray, np.ndarray], float] | None
    unit: str = ""
    scale: float = 1.0  # display scale (accuracy: 100 -> percentage points)


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(pred).reshape(len(y), -1).argmax(-1) == np.asarray(y).reshape(-1)).mean())


def _mae(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(np.asarray(pred, np.float64).reshape(len(y), -1) - np.asarray(y, np.float64).reshape(len(y), -1)).mean())


def _mse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(((np.asarray(pred, np.float64).reshape(len(y), -1) - np.asarray(y, np.float64).reshape(len(y), -1)) ** 2).mean())


ACCURACY = Metric("accuracy", True, _accuracy, unit="%", scale=100.0)
MAE = Metric("mae", False, _mae)
MSE = Metric("mse", False, _mse)
METRICS = {"accuracy": ACCURACY, "mae": MAE, "mse": MSE}


@dataclass
class Split:
    """One data split: ``inputs`` maps input name -> array (first axis = sample); ``targets`` array."""

    inputs: dict[str, np.ndarray]
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: np.ndarray | slice) -> "Split":
        return Split({k: v[idx] for k, v in self.inputs.items()},
                     None if self.targets is None else self.targets[idx])


@dataclass
class Dataset:
    """Train and held-out test splits, plus a short description of where the data comes from.

    ``calibration`` (optional) is the split INT8 calibration reads, with ``calibration_source`` saying
    where it comes from; without it calibration takes training samples.
    """

    train: Split
    test: Split
    source: str = ""
    calibration: Split | None = None
    calibration_source: str = ""


@dataclass
class ModelSpec:
    """Everything the pipeline needs about one architecture (zoo model or the user's own).

    Attributes:
        name: the zoo name or a name derived from the user's reference.
        task: ``"classification"``, ``"regression"``, ``"language-modeling"``, ``"speech-recognition"``,
            ``"generation"``, ``"feature-extraction"`` (embeddings) or ``"other"`` (a user model: its
            2-D outputs are treated as class scores for top-1 agreement).
        build: ``() -> torch.nn.Module`` with untrained weights (``None`` for an ONNX-only model).
        inputs: input specs; dynamic dims are named.
        output_names: names of the ONNX outputs.
        metric: the task metric, or ``None`` (the report then shows output drift against FP32).
        data: ``() -> Dataset`` with real train/test data, or ``None``.
        recipe: training hyper-parameters (seeded), or ``None`` for models that are not trained here.
        train: ``(module, dataset, recipe) -> dict`` training loop; returns training stats.
        evaluate: optional ``(session) -> float`` overriding metric-on-test-split evaluation.
        baselines: optional ``(dataset) -> list[dict]`` classical references for the report (ARIMA).
        onnx_path: for a model given as ``.onnx``: the file (no torch baseline then).
        weights_path: user weights (safetensors or torch checkpoint).
        description: one line for the README's model table and ``optimize models``.
        source: ``"zoo"``, ``"factory"``, ``"pt2"``, ``"onnx"`` or ``"hf"``.
        family: the architecture family (``vision``, ``rnn``, ``gpt``, ``asr``, ``hf``, ``mamba``,
            ``generative``; ``""`` for a user model). The pipeline finds what it must know of a family
            beyond this spec (report rows, extra measures, export method, pruning support) in its
            adapter, :func:`deepship.pipeline.adapters.adapter_for`.
        train_data: optional ``() -> Any`` giving what ``train`` trains on when that is not ``data()``
            (the ASR model trains on utterances; its ``data`` holds recorded streaming chunks, which
            need the trained model).
        data_id: identity of user data attached to the spec (hashes of the ``.npz`` files and how
            they are split); ``""`` when ``data`` is the spec's own seeded code. Part of the cache key
            of every stage that reads data (calibration, fine-tuning, distillation).
    """

    name: str
    task: str
    build: Callable[[], Any] | None
    inputs: list[TensorSpec]
    output_names: list[str] = field(default_factory=lambda: ["output"])
    metric: Metric | None = None
    data: Callable[[], Dataset] | None = None
    recipe: dict[str, Any] | None = None
    train: Callable[..., dict] | None = None
    evaluate: Callable[[Any], float] | None = None
    baselines: Callable[[Dataset], list[dict]] | None = None
    onnx_path: str | None = None
    weights_path: str | None = None
    description: str = ""
    source: str = "zoo"
    extra: dict[str, Any] = field(default_factory=dict)
    family: str = ""
    train_data: Callable[[], Any] | None = None
    data_id: str = ""

    def fingerprint(self) -> dict[str, Any]:
        """Everything in the spec that can change a built artifact, as JSON-able data: name, task,
        source, every input (name, dims, dtype, value range), the output names, the metric and its
        direction, the source's identity (file or factory hash) and the architecture config.

        The artifact cache keys the baseline on this plus the weights' hash, so a changed
        ``--input`` spec, output name or metric never reuses an artifact built for another.
        """
        return {"name": self.name, "task": self.task, "source": self.source, "family": self.family,
                "inputs": [[t.name, list(t.dims), t.dtype, float(t.low), float(t.high)] for t in self.inputs],
                "outputs": list(self.output_names),
                "metric": None if self.metric is None else [self.metric.name, bool(self.metric.higher_is_better)],
                "identity": str(self.extra.get("identity", "")), "config": self.extra.get("config")}

    def example_inputs(self, sizes: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs at the example shape (or ``sizes``), dict name -> numpy array."""
        return {t.name: t.random(sizes, seed=seed + i) for i, t in enumerate(self.inputs)}

    def replace(self, **kw: Any) -> "ModelSpec":
        return dataclasses.replace(self, **kw)

    @property
    def dynamic_dim_names(self) -> list[str]:
        seen: list[str] = []
        for t in self.inputs:
            for d in t.dynamic_dims.values():
                if d not in seen:
                    seen.append(d)
        return seen


def check_inputs(specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    """Validate a feed dict against input specs (names, rank, static dims, dtype).

    Raises:
        InputSpecError: a missing or unexpected input name, or a wrong shape or dtype.
    """
    names = {t.name for t in specs}
    for k in feeds:
        if k not in names:
            raise InputSpecError(f"unexpected input '{k}'; the model takes {', '.join(t.describe() for t in specs)}")
    for t in specs:
        if t.name not in feeds:
            raise InputSpecError(f"missing input '{t.name}'; expected {t.describe()}")
        t.check(np.asarray(feeds[t.name]))
