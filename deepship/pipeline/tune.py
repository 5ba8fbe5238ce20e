"""``optimize tune``: the fastest (or smallest) variant that meets an accuracy budget, searched across
backends and per layer, and the recipe that rebuilds it.

The search, in the order it spends time (each trial is a real variant, built through the cache,
evaluated on the held-out data and timed at ``batch``):

1. **Uniform candidates**: the model's report plan (its family's plan: BF16, FP32 ONNX, INT8
   dynamic/static, FP16, INT4, fusions, ...) and the engine backends asked for (OpenVINO FP32, BF16
   and NNCF INT8). Their latency and metric drop are the Pareto front's first points.
2. **Per-layer sensitivity** (for the fastest INT8 candidate of each backend that misses the budget):
   every quantizable node (MatMul/Gemm/Conv with a constant weight, and fused Attention) is quantized
   *alone*, everything else kept in float; the row records the metric drop on the held-out data and a
   cheap proxy, the output cosine and relative MSE against FP32 on calibration samples (the
   one-layer-at-a-time analysis of ONNX Runtime's ``qdq_loss_debug`` and of HAWQ-style searches).
3. **Mixed precision**: layers are ranked by drop (proxy to break ties) per unit of their share of the
   multiply-accumulates (the latency that keeping one in float gives back, estimated from shapes), and
   the smallest top-``k`` set kept in float that meets the budget is found by bisection over ``k``,
   each probe built and measured for real (the greedy knapsack of ModelOpt's AutoQuantize and NNCF's
   accuracy-control loop, over this project's backends).
4. **Verification**: the chosen variant and the best uniform one are re-timed in interleaved rounds.

The budget is the CI gate's: ``max_drop`` in the metric's display units (percentage points for
accuracy), ``max_rel_drop`` relative, and ``require`` bars on the family's extra measures (e.g.
``recall@1>=0.95`` for sentence encoders). ``recipe.toml`` lists the model and each build step with its
cache key; :func:`build_recipe` replays it and fails when a key differs (another library version or
other data would not build the same artifact).

The recipe and the reports are :mod:`deepship.pipeline.recipe`'s. Libraries: the trials are the
project's own stages (ONNX Runtime's quantizers, NNCF, OpenVINO, torch).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DeepshipError, StageError
from ..runtimes.benchmark import measure as measure_latency
from ..runtimes.engines import get_backend
from ..utils import first_line, machine_info
from .context import ModelContext
from .evaluate import bench_feeds, evaluate
from .quantize import quantizable_layers
from .recipe import artifact_digest
from .report import DEFAULT_PLAN
from .stages import is_registered, stages
from .variants import Variant, library_versions

#: the backends a tune searches unless told: torch (eager variants), onnxruntime, openvino
DEFAULT_BACKENDS = ("torch", "onnxruntime", "openvino")
BACKENDS = ("torch", "onnxruntime", "openvino", "inductor")
OBJECTIVES = ("latency", "size")
_REQ = re.compile(r"^\s*([A-Za-z0-9@_ .-]+?)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


@dataclass
class Budget:
    """What a tuned variant may lose against the FP32 baseline.

    Attributes:
        max_drop: largest worsening of the metric in its display units (the CI gate's ``max_drop``).
        max_rel_drop: largest relative worsening (0.01 = 1%).
        require: ``{measure: (">=" | "<=", value)}`` on the family's extra measures (report notes).
    """

    max_drop: float | None = None
    max_rel_drop: float | None = None
    require: dict[str, tuple[str, float]] = field(default_factory=dict)

    @staticmethod
    def parse_require(items: Sequence[str]) -> dict[str, tuple[str, float]]:
        """``["recall@1>=0.95", ...]`` -> ``{"recall@1": (">=", 0.95)}``.

        Raises:
            StageError: an item that is not ``NAME>=VALUE`` or ``NAME<=VALUE``.
        """
        out = {}
        for it in items:
            m = _REQ.match(it)
            if not m:
                raise StageError(f"--require '{it}' is not NAME>=VALUE or NAME<=VALUE (e.g. recall@1>=0.95)")
            out[m.group(1)] = (m.group(2), float(m.group(3)))
        return out

    def check(self) -> "Budget":
        if self.max_drop is None and self.max_rel_drop is None and not self.require:
            raise StageError("tune needs a budget: give --max-drop, --max-rel-drop or --require")
        for k in ("max_drop", "max_rel_drop"):
            v = getattr(self, k)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise StageError(f"--{k.replace('_', '-')} {v} must be a number >= 0")
        return self


@dataclass
class Trial:
    """One measured variant of the search.

    Attributes:
        name: the variant's name; kind: ``baseline``, ``uniform``, ``sensitivity`` or ``mixed``.
        backend: ``torch``, ``onnxruntime``, ``openvino``, ...; provider: what ran it.
        metric, drop, rel_drop: the metric and its worsening against the baseline (display units / relative).
        extra: the family's extra measures (e.g. ``recall@1``).
        latency_ms: p50 at the tune's batch (ms); size_bytes: the artifact's size.
        meets: within the budget; why: the first bar it misses.
        float_layers: (mixed/sensitivity) the nodes kept in float; steps: the recipe chain to build it.
    """

    name: str
    kind: str
    backend: str
    provider: str = ""
    precision: str = ""
    metric: float | None = None
    drop: float | None = None
    rel_drop: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    size_bytes: int = 0
    meets: bool = False
    why: str = ""
    error: str = ""
    float_layers: list[str] = field(default_factory=list)
    proxy: dict[str, float] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    pareto: bool = False


# ---- the backends' way of keeping layers in float ----------------------------------------------------

def _exclusion_params(backend: str, method: str, names: Sequence[str]) -> dict[str, Any]:
    """The stage parameter that keeps ``names`` in float: ONNX Runtime's ``exclude`` (anchored
    regexes) or OpenVINO's ``ignored`` (NNCF's ignored scope, comma-separated names)."""
    if backend == "openvino":
        return {"ignored": ",".join(sorted(names))}
    return {"exclude": sorted("^" + re.escape(n) + "$" for n in names)}


def _plan_precision(stage: str, method: str, params: dict) -> str:
    """The precision a plan entry produces, before it is built (the stage's, or the engine's ``precision``)."""
    from .stages import get_stage

    if stage == "engine":
        return str(params.get("precision", "fp32"))
    try:
        return get_stage(stage, method).precision
    except StageError:
        return "fp32"


def _excludable(t: Trial) -> bool:
    s = t.steps[-1] if t.steps else {}
    return t.kind == "uniform" and t.precision == "int8" and (
        (s.get("stage") == "engine" and s.get("method") == "openvino")
        or (s.get("stage") == "quantize" and s.get("method") in ("int8-static", "int8-dynamic", "int8-transformer")))


# ---- the tuner -----------------------------------------------------------------------------------------

class Tuner:
    """Runs the search of the module docstring for one model.

    Args:
        ctx: the model (its data gives the metric and the calibration samples).
        budget: :class:`Budget`.
        objective: ``latency`` (p50 at ``batch``, ms) or ``size`` (artifact bytes).
        batch: batch size the latency is measured at.
        backends: subset of :data:`BACKENDS`.
        time_budget_s: wall-clock seconds after which no new trial starts (the ones done are kept).
        threads: intra-op threads for every session (default: the machine's default).
        min_time_s: timing per latency measurement (s).
        max_layers: at most this many layers get a sensitivity trial (the costliest first).
        sensitivity_samples: calibration samples for the sensitivity trials' quantization.
        precisions: if given, only candidates of these precisions (``fp32``, ``bf16``, ``fp16``, ``int8``,
            ``int4``): e.g. without ``bf16`` on a fleet whose CPUs lack AMX/AVX-512 BF16.
        progress: callback for one-line progress messages.

    Raises:
        StageError: unknown backend or objective, no budget.
    """

    def __init__(self, ctx: ModelContext, budget: Budget, objective: str = "latency", batch: int = 32,
                 backends: Sequence[str] = DEFAULT_BACKENDS, time_budget_s: float = 1200.0, threads: int | None = None,
                 min_time_s: float = 0.5, max_layers: int = 48, sensitivity_samples: int = 64,
                 precisions: Sequence[str] | None = None, progress: Callable[[str], None] | None = None):
        if objective not in OBJECTIVES:
            raise StageError(f"--objective {objective} is not one of {', '.join(OBJECTIVES)}")
        bad = [b for b in backends if b not in BACKENDS]
        if bad:
            raise StageError(f"--backends {bad[0]} is not a tune backend; use {', '.join(BACKENDS)}")
        if batch < 1:
            raise StageError(f"--batch {batch} must be >= 1")
        self.ctx, self.budget, self.objective, self.batch = ctx, budget.check(), objective, int(batch)
        self.backends = list(dict.fromkeys(backends))
        self.deadline = time.monotonic() + float(time_budget_s)
        self.time_budget_s = float(time_budget_s)
        self.threads, self.min_time_s = threads, min_time_s
        self.max_layers, self.sensitivity_samples = max_layers, sensitivity_samples
        self.precisions = list(precisions) if precisions else None
        self.progress = progress or (lambda s: None)
        self.trials: list[Trial] = []
        self.skipped: list[str] = []
        self.sensitivity: dict[str, list[dict[str, Any]]] = {}
        self._ref = None
        self._base_metric: float | None = None
        self._cal_ref: np.ndarray | None = None
        self._cal_feeds: dict[str, np.ndarray] | None = None
        self._feeds = bench_feeds(ctx, self.batch)

    # -- helpers ----------------------------------------------------------------------------------------
    def _out_of_time(self, what: str) -> bool:
        if time.monotonic() > self.deadline:
            self.skipped.append(f"{what}: the time budget ({self.time_budget_s:.0f} s) was spent")
            return True
        return False

    def _drop(self, metric: float | None) -> tuple[float | None, float | None]:
        spec, base = self.ctx.spec, self._base_metric
        if metric is None or base is None or spec.metric is None:
            return None, None
        worse = (base - metric) if spec.metric.higher_is_better else (metric - base)
        return worse * spec.metric.scale, (worse / abs(base) if base else None)

    def _judge(self, t: Trial) -> None:
        b = self.budget
        whys = []
        if (b.max_drop is not None or b.max_rel_drop is not None) and t.drop is None:
            whys.append("no metric to check the budget against")
        if b.max_drop is not None and t.drop is not None and t.drop > b.max_drop + 1e-12:
            whys.append(f"drop {t.drop:.4g} > max_drop {b.max_drop:g}")
        if b.max_rel_drop is not None and t.rel_drop is not None and t.rel_drop > b.max_rel_drop + 1e-12:
            whys.append(f"relative drop {t.rel_drop:.3%} > {b.max_rel_drop:.3%}")
        for k, (op, v) in b.require.items():
            got = t.extra.get(k)
            if got is None:
                whys.append(f"{k} not measured for this model")
            elif (op == ">=" and got < v - 1e-12) or (op == "<=" and got > v + 1e-12):
                whys.append(f"{k} {got:g} fails {op} {v:g}")
        t.meets, t.why = not whys, "; ".join(whys)

    def _proxy(self, sess: Any) -> dict[str, float]:
        """Output cosine (mean over rows) and relative MSE against FP32 on calibration samples."""
        if self._cal_feeds is None:
            return {}
        out = sess.run(self._cal_feeds)
        y = np.asarray(out.get(sess.output_names[0], next(iter(out.values()))), np.float64)
        r = self._cal_ref
        if r is None or y.shape != r.shape:
            return {}
        a, b = y.reshape(len(y), -1), r.reshape(len(r), -1)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return {"cosine": float(cos.mean()), "rel_mse": float(((a - b) ** 2).mean() / max((b ** 2).mean(), 1e-30))}

    def _measure(self, t: Trial, v: Variant, time_it: bool = True) -> Trial:
        sess = self.ctx.session(v, threads=self.threads)
        ev = evaluate(self.ctx, sess, self._ref)
        t.metric = ev["metric"]
        t.drop, t.rel_drop = self._drop(t.metric)
        extra = self.ctx.arch.measure(self.ctx, v, sess) if self.ctx.arch.measure is not None else None
        t.extra = dict(extra or {})
        t.provider = getattr(sess, "provider", "") or v.runtime
        t.precision = v.precision
        t.size_bytes = v.size_bytes()
        t.proxy = self._proxy(sess)
        if time_it:
            t.latency_ms = measure_latency(sess, self._feeds, min_time_s=self.min_time_s, batch=self.batch).p50_ms
        t.steps = self.steps(v)
        self._judge(t)
        return t

    def steps(self, v: Variant) -> list[dict[str, Any]]:
        """The build chain from the baseline to ``v``: ``[{name, stage, method, params, parent, key}]``."""
        chain = [a for a in reversed(self.ctx.lineage(v)) if a.stage != "baseline"]
        return [{"name": a.name, "stage": a.stage, "method": a.method, "params": a.params, "parent": a.parent,
                 "key": a.key, "sha256": artifact_digest(a)} for a in chain]

    def _try(self, kind: str, backend: str, name: str, build: Callable[[], Variant], time_it: bool = True,
             **fields: Any) -> Trial:
        t = Trial(name=name, kind=kind, backend=backend, **fields)
        self.progress(f"{self.ctx.spec.name}: {kind} {name}")
        try:
            v = build()
            t.name = v.name
            self._measure(t, v, time_it)
        except DeepshipError as e:
            t.error, t.why = str(e), "failed"
        except Exception as e:  # a library crashing inside a stage: record it, keep searching
            t.error, t.why = f"{type(e).__name__}: {first_line(e, 200)}", "failed"
        self.trials.append(t)
        return t

    # -- the search -----------------------------------------------------------------------------------
    def uniform_plan(self) -> list[tuple[str, str, str, dict, str, str]]:
        """``(name, stage, method, params, parent, backend)`` of the uniform candidates."""
        ctx = self.ctx
        stages()  # loads the built-in stage modules, so is_registered sees them
        plan = []
        for name, stage, method, params, parent in ctx.arch.plan_for(ctx.spec, list(DEFAULT_PLAN)):
            if stage == "engine":
                continue  # engines come from the backends below
            fmt_torch = parent == "fp32-torch" and stage != "export"
            backend = "torch" if fmt_torch else "onnxruntime"
            plan.append((name, stage, method, params, parent, backend))
        if "openvino" in self.backends and get_backend("openvino").available()[0]:
            for prec in ("fp32", "bf16", "int8"):
                plan.append((f"openvino-{prec}", "engine", "openvino", {"precision": prec}, "fp32-onnx", "openvino"))
        if "inductor" in self.backends and get_backend("inductor").available()[0] and ctx.has_torch:
            plan.append(("inductor-fp32", "engine", "inductor", {"precision": "fp32", "device": "cpu"}, "fp32-torch",
                         "inductor"))
        return [p for p in plan if p[5] in self.backends and is_registered(p[1], p[2])]

    def run(self) -> dict[str, Any]:
        """Search, verify, and return the result (see :meth:`result`)."""
        t0 = time.monotonic()
        self.prepare()
        plan = self.uniform_plan()
        for name, stage, method, params, parent, backend in plan:
            if self._out_of_time(name):
                break
            if self.precisions and _plan_precision(stage, method, params) not in self.precisions:
                self.skipped.append(f"{name}: precision {_plan_precision(stage, method, params)} not in --precisions")
                continue
            self._try("uniform", backend, name, lambda n=name: self._build_planned(n, plan))
        self.trials = _dedupe(self.trials)
        self._int4_int8()
        for t in self._mixed_bases():
            self.mixed(t)
        self._verify()
        self.elapsed_s = time.monotonic() - t0
        return self.result()

    def prepare(self) -> Trial:
        """Evaluate and time the baseline (the reference every drop is measured against) and keep its
        outputs on 16 calibration samples for the proxy; returns the baseline trial.

        Raises:
            StageError: a ``--max-drop``/``--max-rel-drop`` budget on a model without a metric.
        """
        ctx = self.ctx
        base = ctx.baseline()
        bsess = ctx.session(base, threads=self.threads)
        ev = evaluate(ctx, bsess, None)
        self._ref, self._base_metric = ev["outputs"], ev["metric"]
        try:
            cal, _ = ctx.calibration(16)
            self._cal_feeds = {k: np.ascontiguousarray(v) for k, v in cal.items()}
            o = bsess.run(self._cal_feeds)
            self._cal_ref = np.asarray(o.get(bsess.output_names[0], next(iter(o.values()))), np.float64)
        except DeepshipError:
            self._cal_feeds = None
        bt = Trial(name=base.name, kind="baseline", backend="torch" if ctx.has_torch else "onnxruntime")
        self._measure(bt, base)
        self.trials.append(bt)
        if self._base_metric is None and (self.budget.max_drop is not None or self.budget.max_rel_drop is not None):
            raise StageError(f"'{ctx.spec.name}' has no metric to hold a --max-drop to; give it held-out data "
                             "(--data) or use --require")
        return bt

    def _int4_int8(self) -> None:
        """For a size search: INT4 weight-only MatMuls with everything ONNX Runtime can still quantize
        dynamically (embedding Gathers, Conv, leftover MatMul/Gemm) in INT8, when the INT4 trial is
        within the budget (the mix can only lose what INT8 embeddings lose on top of it)."""
        if self.objective != "size" or (self.precisions and "int4" not in self.precisions):
            return
        int4 = [t for t in self.trials if t.meets and not t.error and t.steps
                and t.steps[-1]["method"] == "int4-weight-only"]  # the plan's int4-b32, int4-b128, pruned-...-int4
        if not int4 or self._out_of_time("int4-int8"):
            return
        t4 = min(int4, key=self._key)
        ops = ["Gather", "MatMul", "Gemm", "Conv"]
        t = self._try("mixed", "onnxruntime", f"{t4.name}-int8-embed",
                      lambda: self.ctx.build(f"{t4.name}-int8-embed", "quantize", "int8-dynamic", {"op_types": ops},
                                             self.ctx.get(t4.name)))
        t.precision = "int4+int8"

    def _build_planned(self, name: str, plan: Sequence[tuple]) -> Variant:
        """Build ``name`` of ``plan`` after its parents (the baseline for ``fp32-torch``, and for
        ``fp32-onnx`` of an ONNX-only model)."""
        ctx = self.ctx
        if name in ("fp32-torch", "baseline") or (name == ctx.baseline().name):
            return ctx.baseline()
        if name in ctx._variants:
            return ctx._variants[name]
        entry = next((e for e in plan if e[0] == name), None)
        if entry is None:
            raise StageError(f"the tune plan of {ctx.spec.name} has no variant '{name}'")
        _, stage, method, params, parent = entry[:5]
        return ctx.build(name, stage, method, params, self._build_planned(parent, plan))

    def _key(self, t: Trial) -> float:
        if self.objective == "size":
            return float(t.size_bytes or math.inf)
        return t.latency_ms if t.latency_ms is not None else math.inf

    def _mixed_bases(self) -> list[Trial]:
        """Per backend, the best INT8 uniform trial (by objective) that misses the budget, when it beats
        every uniform trial that meets the budget (else no mix of it can win)."""
        ok = [t for t in self.trials if t.meets and not t.error]
        best_ok = min((self._key(t) for t in ok), default=math.inf)
        ok_names = {t.name for t in ok} | {self.ctx.baseline().name}
        out: dict[str, Trial] = {}
        for t in sorted((t for t in self.trials if _excludable(t) and not t.error and not t.meets), key=self._key):
            # keeping layers in float can only recover what its float parent had: that parent must meet the budget
            if self._key(t) < best_ok and t.backend not in out and t.steps[-1]["parent"] in ok_names:
                out[t.backend] = t
        return list(out.values())

    def mixed(self, base: Trial) -> None:
        """Sensitivity of ``base``'s layers (rows in ``self.sensitivity[base.name]``), then the bisection
        over how many stay in float (trials of kind ``mixed``). Needs :meth:`prepare` first."""
        ctx = self.ctx
        step = base.steps[-1]
        parent = ctx.get(step["parent"])
        layers = quantizable_layers(parent.path)
        if not layers:
            self.skipped.append(f"{base.name}: no quantizable layer found in {parent.name}")
            return
        layers = sorted(layers, key=lambda x: -x.macs)[: self.max_layers]
        names = [x.name for x in layers]
        total = sum(x.macs for x in layers)
        backend, method = base.backend, step["method"]
        extra_params = {"inference_precision": "bf16"} if backend == "openvino" and self._bf16_runs() else {}

        def build(float_layers: Sequence[str], samples: int | None, tag: str) -> Callable[[], Variant]:
            p = {**step["params"], **_exclusion_params(backend, method, float_layers), **extra_params}
            if samples and (backend == "openvino" or method == "int8-static"):  # the data-calibrated ones
                p["samples"] = samples
            h = hashlib.sha1(json.dumps(sorted(float_layers)).encode()).hexdigest()[:8]
            return lambda: ctx.build(f"{base.name}-{tag}-{h}", step["stage"], method, p, parent)

        rows = []
        for lay in layers:
            if self._out_of_time(f"sensitivity of {lay.name}"):
                break
            others = [n for n in names if n != lay.name]
            t = self._try("sensitivity", backend, lay.name, build(others, self.sensitivity_samples, "only"),
                          time_it=False, float_layers=others)
            rows.append({"layer": lay.name, "op": lay.op, "macs_share": lay.macs / total, "drop": t.drop,
                         "extra": t.extra, "proxy": t.proxy, "error": t.error})
        self.sensitivity[base.name] = rows
        if not rows:
            return

        def score(r: dict) -> tuple:
            d = max(r["drop"] or 0.0, 0.0)
            px = 1.0 - r["proxy"].get("cosine", 1.0) if r["proxy"] else 0.0
            return (d / max(r["macs_share"], 1e-9), px / max(r["macs_share"], 1e-9))

        measured = [r for r in rows if not r["error"]]
        order = [r["layer"] for r in sorted(measured, key=score, reverse=True)]
        order += [n for n in names if n not in order]  # unmeasured layers last
        lo, hi, found = 1, len(order), None
        while lo <= hi:
            if self._out_of_time(f"mixed precision of {base.name}"):
                break
            k = (lo + hi) // 2
            t = self._try("mixed", backend, f"{base.name}-keep{k}", build(order[:k], None, f"keep{k}"),
                          float_layers=order[:k])
            if t.meets:
                found, hi = t, k - 1
            else:
                lo = k + 1
        if found is None:
            self.skipped.append(f"{base.name}: no mix of float and INT8 layers met the budget")

    def _bf16_runs(self) -> bool:
        """The OpenVINO BF16 trial ran in BF16 (the CPU has native BF16), so float layers may too."""
        for t in self.trials:
            s = t.steps[-1] if t.steps else {}
            if s.get("method") == "openvino" and s.get("params", {}).get("precision") == "bf16" and not t.error:
                v = self.ctx.get(t.name)
                return str(v.info.get("inference_precision", "")).startswith("bf16")
        return False

    def _verify(self) -> None:
        """Re-time the chosen trial and the best uniform trial in interleaved rounds (median of rounds)."""
        chosen = self.chosen()
        if chosen is None or self.objective != "latency":
            self.verification = None
            return
        uni = [t for t in self.trials if t.kind in ("uniform", "baseline") and t.meets and t is not chosen]
        others = sorted(uni, key=self._key)[:1]
        base = [t for t in self.trials if t.kind == "baseline"]
        group = [chosen] + others + [b for b in base if b not in others and b is not chosen]
        sessions = {t.name: self.ctx.session(self.ctx.get(t.name), threads=self.threads) for t in group}
        times: dict[str, list[float]] = {n: [] for n in sessions}
        for _ in range(3):
            for n, s in sessions.items():
                times[n].append(measure_latency(s, self._feeds, min_time_s=self.min_time_s / 2, batch=self.batch).p50_ms)
        self.verification = {n: {"p50_ms_rounds": [round(x, 3) for x in v], "p50_ms": round(float(np.median(v)), 3)}
                             for n, v in times.items()}
        chosen.latency_ms = self.verification[chosen.name]["p50_ms"]

    def chosen(self) -> Trial | None:
        """The best trial by the objective among those within the budget (not sensitivity probes)."""
        ok = [t for t in self.trials if t.meets and not t.error and t.kind in ("uniform", "mixed", "baseline")]
        return min(ok, key=self._key) if ok else None

    def result(self) -> dict[str, Any]:
        """``{"model", "objective", "batch", "budget", "trials", "pareto", "chosen", "sensitivity",
        "verification", "skipped", "machine", "versions", "elapsed_s"}`` (JSON-ready)."""
        pts = [t for t in self.trials if t.kind != "sensitivity" and not t.error and t.drop is not None]
        for t in pts:  # drops below 1e-9 (float noise of an exact conversion) count as 0
            t.drop = 0.0 if abs(t.drop) < 1e-9 else t.drop
        for t in pts:
            t.pareto = not any((self._key(o) <= self._key(t) and (o.drop or 0) <= (t.drop or 0))
                               and (self._key(o) < self._key(t) or (o.drop or 0) < (t.drop or 0)) for o in pts)
        c = self.chosen()
        return {"model": self.ctx.spec.name, "objective": self.objective, "batch": self.batch,
                "budget": asdict(self.budget), "backends": self.backends,
                "base_metric": self._base_metric,
                "metric": self.ctx.spec.metric.name if self.ctx.spec.metric else None,
                "trials": [asdict(t) for t in self.trials], "pareto": [t.name for t in pts if t.pareto],
                "chosen": c.name if c else None, "sensitivity": self.sensitivity,
                "verification": getattr(self, "verification", None), "skipped": self.skipped,
                "machine": machine_info(), "versions": library_versions(), "load_avg": _load_avg(),
                "elapsed_s": round(getattr(self, "elapsed_s", 0.0), 1), "threads": self.threads}


def _load_avg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _dedupe(trials: list[Trial]) -> list[Trial]:
    """One trial per variant name (a parent built on the way and then as a candidate is listed once)."""
    seen: dict[str, Trial] = {}
    for t in trials:
        if t.name not in seen or (seen[t.name].error and not t.error):
            seen[t.name] = t
    return list(seen.values())
