"""Knowledge distillation as a pipeline stage (torch -> torch): train a smaller student to mimic the model.

The loss depends on the task (:data:`DISTILL_LOSSES`):

| task | loss | source |
|---|---|---|
| ``classification`` | ``alpha * CE(s, y) + (1 - alpha) * tau^2 * KL(softmax(t / tau) || softmax(s / tau))`` | Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network" |
| ``regression`` | ``alpha * MSE(s, y) + (1 - alpha) * MSE(s, t)``, both on the model's normalized scale | output matching (the regression form of the same idea) |
| ``language-modeling`` (decoders) | the Hinton loss per token over ``(batch, seq, vocab)`` logits, padding (``-100``) masked | token-level KD (e.g. Kim & Rush 2016, word-level KD) |

``s`` are the student's outputs (logits), ``t`` the teacher's, ``y`` the labels, ``tau`` the
temperature; ``tau^2`` keeps the soft-target gradients on the scale of the hard-target ones (Hinton
et al., section 2). The KL is taken from the teacher's softened distribution to the student's (the
form of Hinton et al., equal to their soft-target cross-entropy up to the teacher's entropy, a
constant). ``alpha = 1`` is plain training on the labels: the same student trained without the
teacher, which the report shows beside the distilled one.

The student's architecture is derived from the teacher's (fewer channels, hidden units or layers, see
:func:`parse_student`) or given explicitly; it is trained from a seeded random initialization with
the teacher's own recipe (optimizer, learning rate, batch size, epochs unless given: classifier
students distill better when trained longer, see :data:`DEFAULT_EPOCH_FACTOR`). The teacher's
outputs over the training split are computed once (it is frozen) and fed with the labels through the
spec's training loop.

Extension point (the GPT decoder of ``deepship/models/gpt/``): give its spec the task
``"language-modeling"`` (or add its task to :data:`DISTILL_LOSSES`) and register its architecture in
:func:`deepship.pipeline.prune.register_architecture` with ``width_keys`` (``d_model``, ``d_mlp``,
``n_head``) and ``layers_key`` (``n_layer``), so students can be derived from it.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import StageError
from ..models.losses import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, IGNORE_INDEX, hinton_loss, regression_kd_loss
from ..models.spec import Dataset, Split
from ..models.train import _train, seed_everything
from ..models.user import _import_factory, is_factory_ref
from . import prune as P
from .context import ModelContext
from .stages import register_stage
from .variants import Variant

DEFAULT_WIDTH = 0.5
#: Without ``epochs``, a student trains this many times the teacher's recipe epochs. Classifier students
#: gain from longer training (soft targets at temperature 4 are learned slowly: MLP width 0.25, 20 epochs:
#: 84% distilled vs 91% on labels alone; 120 epochs: 97.1% vs 96.7%; the "patient teacher" of Beyer et
#: al. 2022), but the sunspots LSTM overfits at 2x (MAE +9% against -2% at 1x), so the default keeps
#: the recipe's tuned length; pass ``epochs`` (``--epochs``) to train longer.
DEFAULT_EPOCH_FACTOR = 1


#: task -> (loss name, whether the labels are class indices)
DISTILL_LOSSES: dict[str, tuple[str, bool]] = {
    "classification": ("hinton-kd (CE + tau^2 KL)", True),
    "regression": ("mse-kd (MSE to labels + MSE to teacher)", False),
    "language-modeling": ("token-kd (per-token CE + tau^2 KL)", True),
}


# ---- students -----------------------------------------------------------------------------------

_PAIR_RE = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*(\[[^\]]*\]|[^,;]+)\s*[,;]?")


def _value(text: str) -> Any:
    text = text.strip()
    if text.startswith("["):
        return [int(x) for x in text.strip("[]").split(",") if x.strip()]
    if "x" in text and all(p.strip().isdigit() for p in text.split("x")):
        return [int(p) for p in text.split("x")]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _scale(v: Any, width: float) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, list)):
        return v
    if isinstance(v, list):
        return [max(1, int(round(x * width))) for x in v]
    return max(1, int(round(v * width)))


def derive_student(teacher: nn.Module, teacher_arch: dict | None, width: float = DEFAULT_WIDTH,
                   layers: int | None = None) -> dict:
    """Student architecture from the teacher's: every width key scaled by ``width``, depth cut to ``layers``.

    Raises:
        StageError: the teacher's class is not registered (no known width keys), or bad width/layers.
    """
    sup = P.arch_support(teacher)
    if sup is None or teacher_arch is None:
        raise StageError(f"cannot derive a student from {type(teacher).__name__}: its architecture is not registered; "
                         "give --student package.module:factory")
    if not 0.0 < width <= 1.0:
        raise StageError(f"student width {width} is outside (0, 1]; give e.g. width=0.5")
    arch = dict(teacher_arch)
    for k in sup.width_keys:
        if k in arch:
            arch[k] = _scale(arch[k], width)
    if layers is not None:
        if sup.layers_key is None:
            raise StageError(f"{type(teacher).__name__} has a fixed depth; drop layers= from --student")
        if layers < 1:
            raise StageError(f"student layers={layers} must be >= 1")
        cur = arch.get(sup.layers_key)
        arch[sup.layers_key] = cur[:layers] if isinstance(cur, list) else layers
    return arch


def parse_student(text: str | None, teacher: nn.Module, teacher_arch: dict | None) -> dict:
    """Resolve a ``--student`` SPEC into stage parameters.

    SPEC is one of:

    - empty or ``auto``: width 0.5 of the teacher (every channel / hidden-unit count halved);
    - a number such as ``0.25``: that width; for a teacher whose architecture is not registered (your
      own ``nn.Module``), the student is the teacher with that fraction of channels kept by
      torch-pruning and its weights re-initialized (``{"pruned_width": w}``);
    - ``width=0.5,layers=1``: width and depth (MLP: keep the first N hidden layers; RNN: N layers);
    - explicit sizes in the teacher's arch keys, e.g. ``c1=8,c2=16,fc=32``, ``hidden=64x32`` or
      ``hidden=[64,32]``, or a JSON object; unnamed keys keep the teacher's values;
    - ``package.module:factory``: a factory returning the student ``nn.Module`` (saved as ``.pt2``).

    Returns:
        ``{"arch": dict}``, ``{"pruned_width": float}`` or ``{"factory": "package.module:factory"}``.

    Raises:
        StageError: unknown keys (names the teacher's keys), or a SPEC that does not parse.
    """
    text = (text or "").strip()
    if is_factory_ref(text):
        return {"factory": text}
    try:
        width = DEFAULT_WIDTH if text in ("", "auto") else float(text.removeprefix("width=").strip())
    except ValueError:
        width = None
    if width is not None:
        if P.arch_support(teacher) is None or teacher_arch is None:
            if P.why_not_structured(teacher) is None:  # any prunable module: the teacher's shape at that width
                if not 0.0 < width < 1.0:
                    raise StageError(f"student width {width} is outside (0, 1); give e.g. 0.5")
                return {"pruned_width": width}
        return {"arch": derive_student(teacher, teacher_arch, width)}
    if text.startswith("{"):
        try:
            pairs = json.loads(text)
        except json.JSONDecodeError as e:
            raise StageError(f"--student '{text}' is not valid JSON ({e.msg}); write e.g. '{{\"c1\": 8}}'") from None
        if not isinstance(pairs, dict):
            raise StageError(f"--student '{text}' must be a JSON object of architecture sizes")
    else:
        matches = list(_PAIR_RE.finditer(text))
        if not matches or "".join(m.group(0) for m in matches).replace(" ", "") != text.replace(" ", ""):
            raise StageError(f"cannot parse --student '{text}'; write width=0.5, c1=8,c2=16,fc=32, hidden=64x32, "
                             "a JSON object or package.module:factory")
        pairs = {m.group(1): _value(m.group(2)) for m in matches}
    width = float(pairs.pop("width", 1.0))
    layers = pairs.pop("layers", None) if "layers" not in (teacher_arch or {}) else None
    arch = derive_student(teacher, teacher_arch, width, int(layers) if layers is not None else None)
    unknown = [k for k in pairs if k not in arch]
    if unknown:
        raise StageError(f"unknown student key(s) {', '.join(unknown)}; the teacher's architecture has "
                         f"{', '.join(sorted(arch))} (plus width=, layers=)")
    arch.update(pairs)
    return {"arch": arch}


def _build_student(ctx: ModelContext, params: dict, teacher: nn.Module) -> nn.Module:
    seed_everything(int(params.get("seed", (ctx.spec.recipe or {}).get("seed", 0))))
    if "pruned_width" in params:  # the teacher's layout at a smaller width, trained from scratch
        w = float(params["pruned_width"])
        student, _ = P.structured_prune(copy.deepcopy(teacher), P.example_args(ctx), 1.0 - w)
        for mod in student.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
        return student.train()
    if "factory" in params:
        m = _import_factory(params["factory"])()
        if not isinstance(m, nn.Module):
            raise StageError(f"student factory '{params['factory']}' returned {type(m).__name__}, not an nn.Module")
        return m
    try:
        return ctx.fresh_module(params["arch"])
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise StageError(f"cannot build student {params['arch']}: {type(e).__name__}: {str(e)[:120]}") from None


def teacher_outputs(teacher: nn.Module, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The frozen teacher's first output over ``inputs`` (float32, leading dim = samples)."""
    outs = []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch_size):
            o = teacher(torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size])))
            o = o[0] if isinstance(o, (tuple, list)) else o
            outs.append(o.float().numpy())
    return np.concatenate(outs)


def check_distillable(ctx: ModelContext) -> None:
    """Check up front that ``ctx``'s model can be distilled here.

    Raises:
        StageError: no labeled training data, a task without a distillation loss, or more than one input.
    """
    spec = ctx.spec
    student = (spec.extra or {}).get("draft")
    if spec.task == "language-modeling" and student:
        raise StageError(f"'{spec.name}' is distilled by its own recipe, not by this stage: its student is the zoo "
                         f"model '{student}' (token-level KD on the training text and on the "
                         f"target's own continuations); run: optimize train {student}, optimize report {student}")
    if spec.task not in DISTILL_LOSSES:
        raise StageError(f"no distillation loss for task '{spec.task}' of '{spec.name}'; tasks with one: "
                         f"{', '.join(DISTILL_LOSSES)}")
    if len(spec.inputs) != 1:
        raise StageError(f"distillation here trains single-input models; '{spec.name}' takes {len(spec.inputs)} inputs "
                         f"({', '.join(t.name for t in spec.inputs)})")
    ds = ctx.dataset()
    if ds is None or ds.train.targets is None:
        raise StageError(f"distilling '{spec.name}' needs labeled training data; pass --train-data FILE.npz with "
                         "inputs and targets")


def distill_train(ctx: ModelContext, teacher: nn.Module, student: nn.Module, temperature: float = DEFAULT_TEMPERATURE,
                  alpha: float = DEFAULT_ALPHA, epochs: int | None = None, seed: int | None = None) -> dict:
    """Train ``student`` in place on the training split with the task's distillation loss.

    Uses the spec's seeded training loop (``deepship.models.train``, AdamW + cosine decay + clipping)
    and recipe, for ``epochs`` (default: :data:`DEFAULT_EPOCH_FACTOR` x the recipe's); the teacher's
    outputs are precomputed once and packed beside the labels.

    Returns:
        Training stats ``{"train_s", "final_loss", "epochs"}``.

    Raises:
        StageError: no labeled training data or recipe, a task without a distillation loss, or a
            student whose output shape differs from the teacher's.
    """
    spec = ctx.spec
    check_distillable(ctx)
    ds = ctx.dataset()
    recipe = {"epochs": 30, "lr": 1e-3, "batch_size": 64, "weight_decay": 0.0, "seed": 0, **(spec.recipe or {})}
    recipe["epochs"] = int(epochs) if epochs is not None else int(recipe["epochs"]) * DEFAULT_EPOCH_FACTOR
    if seed is not None:
        recipe["seed"] = int(seed)
    x = ds.train.inputs[spec.inputs[0].name]
    t_out = teacher_outputs(teacher.eval(), x)
    with torch.inference_mode():
        s_probe = student.eval()(torch.from_numpy(np.ascontiguousarray(x[:2])))
    s_probe = s_probe[0] if isinstance(s_probe, (tuple, list)) else s_probe
    if tuple(s_probe.shape[1:]) != tuple(t_out.shape[1:]):
        raise StageError(f"student output {tuple(s_probe.shape[1:])} differs from the teacher's {tuple(t_out.shape[1:])} "
                         "per sample; the student must predict the same thing")
    _, is_class = DISTILL_LOSSES[spec.task]
    y = np.asarray(ds.train.targets).astype(np.float32).reshape(t_out.shape[:-1] + (-1,))
    k = y.shape[-1]
    packed = np.concatenate([y, t_out.astype(np.float32)], axis=-1)
    train = Dataset(Split(dict(ds.train.inputs), packed), ds.test, ds.source)
    T, a = float(temperature), float(alpha)
    if is_class:
        ignore = IGNORE_INDEX if spec.task == "language-modeling" else None

        def loss_fn(out, yp):
            return hinton_loss(out, yp[..., k:], yp[..., 0].round().long(), T, a, ignore_index=ignore)
    else:
        scale = float(getattr(student, "std", torch.tensor(1.0)))

        def loss_fn(out, yp):
            return regression_kd_loss(out, yp[..., k:], yp[..., :k], a, scale)

    with P.train_threads(student):
        stats = _train(student, train, recipe, loss_fn, torch.float32)
    student.eval()
    return {**stats, "epochs": recipe["epochs"], "seed": recipe["seed"]}


# ---- the stage ----------------------------------------------------------------------------------

@register_stage("distill", "kd", "torch", "torch", uses_data=True)
def _distill_stage(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """Train a smaller student on the teacher's softened outputs (Hinton et al. 2015; MSE for regression)."""
    teacher = P.parent_module(ctx, parent)
    if "arch" not in params and "factory" not in params and "pruned_width" not in params:
        params = {**params, **parse_student(params.get("student"), teacher, _teacher_arch(ctx, parent))}
    student = _build_student(ctx, params, teacher)
    T = float(params.get("temperature", DEFAULT_TEMPERATURE))
    a = float(params.get("alpha", DEFAULT_ALPHA))
    stats = distill_train(ctx, teacher, student, T, a, params.get("epochs"), params.get("seed"))
    files, saved = P.save_torch_variant(ctx, student, out)
    if "arch" in params and saved.get("arch") is None and files[0].endswith(".safetensors"):
        saved["arch"] = params["arch"]
    n_s, n_t = P.count_parameters(student), P.count_parameters(teacher)
    arch = params.get("arch") or params.get("factory") or f"teacher at width {params.get('pruned_width')} (torch-pruning, re-initialized)"
    return files, {**saved, "student_arch": arch, "parameters": n_s,
                   "teacher_parameters": n_t, "param_ratio": n_s / max(n_t, 1), "temperature": T, "alpha": a,
                   "with_teacher": a < 1.0, "loss_name": DISTILL_LOSSES[ctx.spec.task][0] if a < 1.0 else "labels only",
                   "train": stats,
                   "method_source": "Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network"}


def _teacher_arch(ctx: ModelContext, parent: Variant | None) -> dict | None:
    if ctx.spec.source != "zoo":
        return None
    return (parent.info.get("arch") if parent is not None else None) or (ctx.spec.recipe or {}).get("arch")


def resolve_params(ctx: ModelContext, parent: Variant | None, student: str | None, temperature: float, alpha: float,
                   epochs: int | None = None, seed: int | None = None) -> dict:
    """Stage parameters with the student SPEC resolved to an architecture (so the cache key is exact).
    ``parent`` ``None`` is the baseline (nothing is built to resolve them).

    Raises:
        StageError: a SPEC that does not parse or does not fit the teacher (see :func:`parse_student`),
            a temperature that is not positive, alpha outside [0, 1], epochs below 1.
    """
    check_distillable(ctx)
    if not float(temperature) > 0 or not 0.0 <= float(alpha) <= 1.0:
        raise StageError(f"--temperature {temperature} must be > 0 and --alpha {alpha} in [0, 1]")
    if epochs is not None and int(epochs) < 1:
        raise StageError(f"--epochs {epochs} must be a positive integer")
    # the teacher's class and arch are all parse_student needs: an untrained baseline avoids loading weights
    base = parent is None or parent.stage == "baseline"
    teacher = ctx.fresh_module() if base else ctx.torch_session(parent).module
    p: dict[str, Any] = {**parse_student(student, teacher, _teacher_arch(ctx, None if base else parent)),
                         "temperature": float(temperature), "alpha": float(alpha)}
    p["epochs"] = int(epochs) if epochs is not None else \
        int((ctx.spec.recipe or {}).get("epochs", 30)) * DEFAULT_EPOCH_FACTOR
    if seed is not None:
        p["seed"] = int(seed)
    return p


def student_name(student: str | None, params: dict, with_teacher: bool = True) -> str:
    """Variant name of a student: ``distilled-w50`` for a width-0.5 student derived from the teacher
    (``-l1`` appended for ``layers=1``), ``distilled-c1_8-c2_16-fc_32`` for explicit sizes,
    ``distilled-<factory>`` for a factory; ``student-...-scratch`` when trained without the teacher."""
    text = (student or "").strip()
    if "factory" in params:
        tag = params["factory"].split(":")[-1]
    else:
        m = re.fullmatch(r"(?:width\s*=\s*)?(\d*\.?\d+)(?:\s*[,;]\s*layers\s*=\s*(\d+))?", text)
        if text in ("", "auto") or m:
            w = float(m.group(1)) if m else DEFAULT_WIDTH
            tag = f"w{int(round(w * 100))}" + (f"-l{m.group(2)}" if m and m.group(2) else "")
        else:
            tag = "-".join(f"{k}_{'x'.join(map(str, v)) if isinstance(v, list) else v}"
                           for k, v in params["arch"].items() if not isinstance(v, str))
    return f"distilled-{tag}" if with_teacher else f"student-{tag}-scratch"


def distill_entries(width: float = DEFAULT_WIDTH, temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                    epochs: int | None = None, control: bool = False, export: bool = True,
                    quantize: Sequence[str] = (), parent: str = "fp32-torch") -> list[tuple[str, str, str, dict, str]]:
    """Report-plan entries: a width-``width`` student distilled from ``parent`` (``distilled-w50``),
    carried on to ONNX and ``quantize``; with ``control``, the same student trained on labels only
    (``student-w50-scratch``, alpha 1)."""
    tag = f"w{int(round(width * 100))}"
    base: dict[str, Any] = {"student": f"width={width}", "temperature": float(temperature)}
    base.update({"epochs": int(epochs)} if epochs is not None else {"epochs_factor": DEFAULT_EPOCH_FACTOR})
    out = [(f"distilled-{tag}", "distill", "kd", {**base, "alpha": float(alpha)}, parent)]
    if export:
        out += P.chain_entries(f"distilled-{tag}", quantize)
    if control:
        out.append((f"student-{tag}-scratch", "distill", "kd", {**base, "alpha": 1.0}, parent))
    return out


def distill_markdown(rows: list[dict], spec: Any) -> str:
    """Rows of :func:`deepship.pipeline.prune.measure_variants` (teacher first) as a Markdown table:
    parameters, size, metric, change against the teacher and p50 latency per batch size."""
    if not rows:
        return ""
    met = spec.metric
    scale = met.scale if met else 1.0
    batches = list(rows[0]["latency_ms"])
    hdr = ["variant", "parent", "format", "parameters", "size", met.name if met else "metric", "change vs teacher"] + \
          [f"p50 ms b{b}" for b in batches]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        m, d = r["metric"], r["metric_change"]
        cells = [r["variant"], r["parent"] or "-", r["format"], f"{r['parameters']:,}" if r["parameters"] else "-",
                 f"{r['size_bytes']:,} B" if r["size_bytes"] else "-", "-" if m is None else f"{m * scale:.2f}",
                 "-" if d is None else f"{d * scale:+.2f}"] + [f"{r['latency_ms'][b]:.3f}" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
