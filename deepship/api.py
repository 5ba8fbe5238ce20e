"""The Python API: the same operations as the ``optimize`` command, from code.

Example::

    import deepship as ds

    ctx = ds.load("cnn")                                  # zoo model, trained weights from cache
    onnx_v = ds.export(ctx)                               # FP32 ONNX, parity-checked
    q = ds.quantize(ctx, "int8-static", calibration="entropy")
    print(q.info["nodes"], q.size_bytes())
    report = ds.report(["cnn", "lstm"], out_dir="report") # the whole variant tree, measured

    # your own model: factory + weights + input spec, labeled data for the metric
    ctx = ds.load("mypkg.models:make_net", inputs=["x:float32[batch,3,32,32]"],
                  weights="net.safetensors", data="val.npz")
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import OutputPathError, StageError
from .models import resolve
from .models.spec import ModelSpec
from .pipeline.stages import ModelContext
from .pipeline.variants import Variant
from .utils import atomic_dir, atomic_file, ensure_dir

QUANT_DEFAULT_PARAMS = {
    "int8-static": {"calibration": "minmax", "per_channel": True},
    "int4-weight-only": {"block_size": 32},
}


def load(ref: str | ModelSpec, inputs: Sequence[str] | None = None, weights: str | None = None,
         data: str | None = None, metric: str | None = None, evaluate: Callable[[Any], float] | None = None,
         output_names: Sequence[str] | None = None, retrain: bool = False) -> ModelContext:
    """Resolve a model reference (see :func:`deepship.models.resolve`) into a :class:`ModelContext`."""
    spec = ref if isinstance(ref, ModelSpec) else resolve(ref, inputs=inputs, weights=weights, data=data,
                                                          metric=metric, evaluate=evaluate, output_names=output_names)
    return ModelContext(spec, retrain=retrain)


def _onnx_parent(ctx: ModelContext, opset: int | None = None) -> Variant:
    base = ctx.baseline()
    if base.format == "onnx":
        return base
    return export(ctx, opset=opset)


def export(ctx: ModelContext, opset: int | None = None) -> Variant:
    """FP32 ONNX variant (dynamo exporter, named dynamic dims, parity at two shapes).

    Raises:
        ExportError: export or parity failed; StageError: the model is already ONNX.
    """
    if not ctx.has_torch:
        raise StageError(f"model '{ctx.spec.name}' is already ONNX; nothing to export")
    params = {"opset": opset} if opset else {}
    return ctx.build("fp32-onnx", "export", "onnx", params, ctx.baseline())


def quantize(ctx: ModelContext, method: str, **params: Any) -> Variant:
    """Quantize: ``int8-dynamic``, ``int8-static`` (``calibration=``, ``per_channel=``), ``fp16``,
    ``int4-weight-only`` (``block_size=``) on the FP32 ONNX model, or ``bf16`` on the torch model.

    Raises:
        StageError: unknown method, or ``bf16`` on an ONNX-only model.
    """
    from .pipeline.stages import get_stage

    impl = get_stage("quantize", method)
    p = {**QUANT_DEFAULT_PARAMS.get(method, {}), **{k: v for k, v in params.items() if v is not None}}
    name = method if method != "bf16" else "bf16-torch"
    if method == "int8-static" and p.get("calibration", "minmax") != "minmax":
        name = f"int8-static-{p['calibration']}"
    if impl.consumes == "torch":
        if not ctx.has_torch:
            raise StageError(f"{method} needs a torch model; '{ctx.spec.name}' is ONNX: use fp16 or int8-static")
        return ctx.build(name, "quantize", method, p, ctx.baseline())
    return ctx.build(name, "quantize", method, p, _onnx_parent(ctx))


def engine(ctx: ModelContext, backend: str = "onnxruntime", precision: str = "fp32",
           source: Variant | None = None, **params: Any) -> Variant:
    """Build an engine with ``backend`` from ``source`` (default: the backend's ``parent_for`` pick for
    ``precision``, else the FP32 ONNX variant, or the torch model for ``inductor``).

    ``params`` go to the backend: ``shapes`` (``{dim: (min, opt, max)}``), ``providers``
    (onnxruntime), ``device`` (inductor), ``calibration`` (tensorrt INT8), ...

    Raises:
        StageError: unknown or unavailable backend (with the install line), unsupported precision.
    """
    from .runtimes.engines import get_backend

    b = get_backend(backend)
    ok, why = b.available()
    if not ok:
        raise StageError(why)
    if precision not in b.precisions:
        raise StageError(f"the {backend} engine builds {', '.join(b.precisions)}; got '{precision}'")
    params = {k: v for k, v in params.items() if v is not None}
    if source is None and hasattr(b, "parent_for"):
        source = b.parent_for(ctx, precision, params)
    parent = source or (_onnx_parent(ctx) if b.consumes == "onnx" else ctx.baseline())
    name = f"{backend}-engine" + ("" if parent.name in ("fp32-onnx", "fp32-torch") else f"-{parent.name}")
    if precision != parent.precision and not name.endswith(f"-{precision}"):
        name += f"-{precision}"
    return ctx.build(name, "engine", backend, {"precision": precision, **params}, parent)


def prune(ctx: ModelContext, sparsity: float = 0.5, method: str = "structured", importance: str | None = None,
          finetune_steps: int | None = None, source: Variant | None = None) -> Variant:
    """Prune the torch model (or the torch variant ``source``) and fine-tune it briefly.

    ``method="structured"`` removes channels/hidden units with torch-pruning (group ``l2`` magnitude by
    default, or ``l1``); ``"unstructured"`` zeroes the smallest weights (global L1) and shrinks only
    the compressed size. See :mod:`deepship.pipeline.prune`. Carry the result on with :func:`carry_on`.

    Raises:
        StageError: ONNX-only model, an architecture that cannot be pruned (says why), bad sparsity,
            method or importance.
    """
    from .pipeline import prune as P

    P.prunable(ctx, method, source)
    parent = source or ctx.baseline()
    params = {"sparsity": float(sparsity), "importance": importance or ("l2" if method == "structured" else "l1"),
              "finetune_steps": int(P.DEFAULT_FINETUNE_STEPS if finetune_steps is None else finetune_steps)}
    name = P.variant_name(method, sparsity)
    return ctx.build(name if parent.stage == "baseline" else f"{parent.name}-{name}", "prune", method, params, parent)


def distill(ctx: ModelContext, student: str | None = None, temperature: float = 4.0, alpha: float = 0.1,
            epochs: int | None = None, seed: int | None = None, source: Variant | None = None,
            name: str | None = None) -> Variant:
    """Train a smaller student on the teacher's outputs (the torch model, or the torch variant ``source``).

    ``student``: ``auto`` (width 0.5), a width, ``width=0.5,layers=1``, explicit sizes
    (``c1=8,c2=16,fc=32``) or ``package.module:factory``; ``alpha=1`` trains the same student on
    labels only (the no-teacher control). See :mod:`deepship.pipeline.distill`.

    Raises:
        StageError: ONNX-only model, a student SPEC that does not fit, no training data, a task
            without a distillation loss.
    """
    from .pipeline import distill as D

    if not ctx.has_torch:
        raise StageError(f"cannot distill '{ctx.spec.name}': it is an ONNX file; distillation needs the torch teacher")
    D.check_distillable(ctx)
    parent = source or ctx.baseline()
    params = D.resolve_params(ctx, parent, student, temperature, alpha, epochs, seed)
    name = name or D.student_name(student, params, with_teacher=alpha < 1.0)
    return ctx.build(name, "distill", "kd", params, parent)


def carry_on(ctx: ModelContext, source: Variant, quantize: Sequence[str] = ()) -> list[Variant]:
    """Export a torch variant (pruned, distilled) to ONNX with the parity check, then apply each
    quantize method: variants ``SOURCE-onnx`` and ``SOURCE-<method>``, returned in that order.

    Raises:
        StageError: an unknown quantize method; ExportError: export or parity failed.
    """
    from .pipeline.prune import chain_entries
    from .pipeline.stages import get_stage

    for m in quantize:
        get_stage("quantize", m)
    return [ctx.build(n, stage, method, params, parent)
            for n, stage, method, params, parent in chain_entries(source.name, quantize)]


def publish(v: Variant, dest: str | Path) -> list[Path]:
    """Copy a variant's artifact out of the cache to ``dest`` (atomically).

    An ``.onnx`` destination gets the model file (and ``DEST.data`` if it has external data);
    any other destination is a folder that receives every artifact file.

    Raises:
        OutputPathError: ``dest`` cannot be written.
    """
    dest = Path(dest)
    if v.path is None:
        raise OutputPathError(f"variant {v.name} has no file to write")
    if dest.suffix == ".onnx" and v.format == "onnx":
        ensure_dir(dest.parent)
        if len(v.files) > 1:  # external data: re-save so the location inside matches the new name
            import onnx

            from .exporters.onnx import save_onnx

            return save_onnx(onnx.load(str(v.path)), dest)
        with atomic_file(dest) as tmp:
            shutil.copyfile(v.path, tmp)
        return [dest]
    if dest.exists() and not dest.is_dir():
        raise OutputPathError(f"{dest} exists and is not a folder; give a folder or an .onnx path")
    with atomic_dir(dest) as tmp:
        for f in v.files:
            shutil.copyfile(Path(v.dir) / f, tmp / f)
    return [dest / f for f in v.files]


def report(models: Sequence[str | ModelSpec], out_dir: str | Path = "report", **kw: Any) -> dict:
    """Run :func:`deepship.pipeline.report.run_report` on model references or specs."""
    from .pipeline.report import run_report

    specs = [m if isinstance(m, ModelSpec) else resolve(m) for m in models]
    return run_report(specs, out_dir=out_dir, **kw)


def check(report_path: str | Path, baseline_path: str | Path, budgets: str | Path | None = None,
          max_drop: float | None = None, max_rel_drop: float | None = None,
          latency_tolerance: float | None = None):
    """Run the CI gate; returns a :class:`deepship.pipeline.check.GateResult`."""
    from .pipeline.check import Budget, check as _check, load_budgets, load_report

    r, b = load_report(report_path), load_report(baseline_path)
    dflt, per_metric, per_variant = load_budgets(budgets, Budget(max_drop, max_rel_drop, latency_tolerance))
    # flags override the file's [default]
    dflt = Budget(max_drop if max_drop is not None else dflt.max_drop,
                  max_rel_drop if max_rel_drop is not None else dflt.max_rel_drop,
                  latency_tolerance if latency_tolerance is not None else dflt.latency_tolerance)
    return _check(r, b, dflt, per_metric, per_variant)


def generate(model: str = "gpt", prompt: str | Sequence[int] = "", max_new_tokens: int = 64, variant: str = "fp32-onnx",
             speculative: bool = False, draft: str = "gpt-draft", k: int = 4, greedy: bool = True,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop: Sequence[str] = (), threads: int | None = 1) -> dict[str, Any]:
    """Generate text with a zoo decoder (``gpt``), with the KV cache, optionally by speculative decoding.

    Args:
        model: the decoder's zoo name.
        prompt: text, or token ids of the model's tokenizer.
        max_new_tokens: token limit (>= 1); generation also stops at the context length.
        variant: ``fp32-torch``, ``fp32-onnx``, ``int8-dynamic``, ``int4-b32``, ``int4-b128`` (aliases
            ``torch``, ``fp32``, ``int8``, ``int4``); built and cached on first use.
        speculative: draft with ``draft`` (its FP32 ONNX variant; torch for a torch target), ``k`` tokens a round.
        greedy: argmax decoding; else sampling with ``temperature``, ``top_k``, ``top_p`` and ``seed``.
        stop: strings that end generation; each must be one token of the tokenizer (e.g. ``"\\n"``).
        threads: intra-op threads; 1 is the fastest for batch-1 decoding of this small model (a second
            thread costs more in synchronization per operator than it adds).

    Timings are taken after a short warm-up (the first calls of a fresh session allocate its buffers).

    Returns:
        ``{"text", "prompt_tokens", "tokens", "new_tokens", "finish_reason", "prefill_ms", "decode_ms",
        "tokens_per_s", "acceptance_rate", "variant", "draft"}`` (ms, tokens/s).

    Raises:
        InputSpecError: empty prompt, prompt longer than the context, unknown token ids, ``k <= 0``,
            a stop string that is not one token, draft and target vocabularies that differ.
        StageError: unknown variant; InputSpecError also for a model that is not a GPT decoder.
    """
    import numpy as np

    from .errors import InputSpecError
    from .models import gpt as G
    from .runtimes.generate import Sampling, check_prompt, generate as _generate, speculative_generate

    ctx = load(model)
    cfg = G.config_of(ctx.spec)
    ids = check_prompt(G.encode(prompt) if isinstance(prompt, str) else prompt, cfg.layout())  # before any build
    sampling = Sampling(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    sampling.check(cfg.vocab_size)
    if max_new_tokens < 1:
        raise InputSpecError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    stop_ids = G.stop_token_ids(stop)
    dctx = None
    if speculative:
        if int(k) != k or k <= 0:
            raise InputSpecError(f"--k {k} must be a positive integer (draft tokens proposed per round)")
        dctx = load(draft)
        dcfg = G.config_of(dctx.spec)
        if dcfg.vocab_size != cfg.vocab_size:
            raise InputSpecError(f"draft '{draft}' has a vocabulary of {dcfg.vocab_size} tokens, target '{model}' "
                                 f"{cfg.vocab_size}; use a draft trained with the target's tokenizer")
    v = G.build_variant(ctx, variant)
    runner = G.variant_runner(ctx, v, threads=threads)
    draft_name = None
    if dctx is not None:
        dv = dctx.baseline() if v.format == "torch" else G.build_variant(dctx, "fp32-onnx")
        drunner = G.variant_runner(dctx, dv, threads=threads)
        speculative_generate(runner, drunner, ids, min(max_new_tokens, 2 * int(k) + 2), k=k)  # warm-up
        res = speculative_generate(runner, drunner, ids, max_new_tokens, k=k, sampling=sampling, stop_tokens=stop_ids)
        draft_name = f"{draft}/{dv.name}"
    else:
        _generate(runner, ids, min(max_new_tokens, 4))  # warm-up
        res = _generate(runner, ids, max_new_tokens, sampling=sampling, stop_tokens=stop_ids)
    toks = res.row(0)
    return {"text": G.decode(toks), "prompt_tokens": int(np.asarray(ids).shape[-1]), "tokens": [int(t) for t in toks],
            "new_tokens": int(len(toks)), "finish_reason": res.finish_reasons[0], "prefill_ms": res.prefill_ms,
            "decode_ms": res.decode_ms, "tokens_per_s": res.tokens_per_s, "acceptance_rate": res.acceptance_rate,
            "variant": v.name, "draft": draft_name, "k": k if speculative else None}
