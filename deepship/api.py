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

import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputSpecError, OutputPathError, StageError
from .models import asr as A
from .models import gpt as G
from .models import resolve
from .models.asr import data as S
from .models.spec import ModelSpec
from .pipeline import distill as D
from .pipeline import prune as P
from .pipeline.arch import asr as AA
from .pipeline.arch import gpt as AG
from .pipeline.check import BUDGET_KEYS, Budget, load_budgets, load_report
from .pipeline.check import check as _check
from .pipeline.context import ModelContext
from .pipeline.engines import engine_source
from .pipeline.export import export_variant
from .pipeline.quantize import QUANT_DEFAULT_PARAMS, quantize_variant  # noqa: F401  (part of the API)
from .pipeline.report import run_report
from .pipeline.stages import get_stage
from .pipeline import recipe as R
from .pipeline import tune as T
from .pipeline.variants import Variant
from .pipeline.variants import publish as _publish
from .runtimes import asr_stream
from .runtimes.asr_stream import Endpointer, Stream
from .runtimes.engines import get_backend
from .runtimes.generate import check_max_new_tokens, check_prompt, speculative_generate
from .runtimes.generate import generate as _generate
from .runtimes.kvcache import KVLayout
from .runtimes.sampling import Sampling
from .utils import atomic_dir


def load(ref: str | ModelSpec, inputs: Sequence[str] | None = None, weights: str | None = None,
         data: str | None = None, metric: str | None = None, evaluate: Callable[[Any], float] | None = None,
         output_names: Sequence[str] | None = None, retrain: bool = False, train_data: str | None = None,
         calibration_data: str | None = None, name: str | None = None) -> ModelContext:
    """Resolve a model reference (see :func:`deepship.models.resolve`) into a :class:`ModelContext`.

    ``data`` (evaluation), ``train_data`` (fine-tuning) and ``calibration_data`` (INT8) are ``.npz``
    files (:mod:`deepship.models.userdata`); ``name`` renames the model in reports.

    Raises:
        UnknownModelError, WeightsError, InputSpecError, DataError: from the loaders.
    """
    spec = ref if isinstance(ref, ModelSpec) else resolve(ref, inputs=inputs, weights=weights, data=data,
                                                          metric=metric, evaluate=evaluate, output_names=output_names,
                                                          train_data=train_data, calibration_data=calibration_data,
                                                          name=name)
    return ModelContext(spec, retrain=retrain)


def export(ctx: ModelContext, opset: int | None = None) -> Variant:
    """FP32 ONNX variant (dynamo exporter, named dynamic dims, parity at two shapes).

    Raises:
        ExportError: export or parity failed; StageError: the model is already ONNX.
    """
    return export_variant(ctx, opset)


def quantize(ctx: ModelContext, method: str, **params: Any) -> Variant:
    """Quantize: ``int8-dynamic``, ``int8-static`` (``calibration=``, ``per_channel=``), ``fp16``,
    ``int4-weight-only`` (``block_size=``) on the FP32 ONNX model, or ``bf16`` on the torch model.

    Raises:
        StageError: unknown method, or ``bf16`` on an ONNX-only model.
    """
    return quantize_variant(ctx, method, **params)


def engine(ctx: ModelContext, backend: str = "onnxruntime", precision: str = "fp32",
           source: Variant | None = None, **params: Any) -> Variant:
    """Build an engine with ``backend`` from ``source`` (default: :func:`deepship.pipeline.engines.engine_source`:
    the FP32 ONNX variant, the FP16/INT8 ONNX variant the backend takes that precision from, or the
    torch model for ``inductor``).

    ``params`` go to the backend: ``shapes`` (``{dim: (min, opt, max)}``), ``providers``
    (onnxruntime), ``device`` (inductor), ``calibration`` (tensorrt INT8), ...

    Raises:
        StageError: unknown or unavailable backend (with the install line), unsupported precision.
    """
    b = get_backend(backend)
    ok, why = b.available()
    if not ok:
        raise StageError(why)
    if precision not in b.precisions:
        raise StageError(f"the {backend} engine builds {', '.join(b.precisions)}; got '{precision}'")
    params = {k: v for k, v in params.items() if v is not None}
    parent = source or engine_source(ctx, backend, precision, params)
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
    P.prunable(ctx, method, source)
    imp = importance or ("l2" if method == "structured" else "l1")
    if imp not in P.IMPORTANCE_CRITERIA:
        raise StageError(f"unknown importance '{imp}'; use one of {', '.join(P.IMPORTANCE_CRITERIA)}")
    if not 0.0 < float(sparsity) < 1.0:
        raise StageError(f"sparsity {sparsity} is outside (0, 1); give a fraction such as 0.5")
    parent = source or ctx.baseline()
    params = {"sparsity": float(sparsity), "importance": imp,
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
    if not ctx.has_torch:
        raise StageError(f"cannot distill '{ctx.spec.name}': it is an ONNX file; distillation needs the torch teacher")
    params = D.resolve_params(ctx, source, student, temperature, alpha, epochs, seed)  # before building anything
    parent = source or ctx.baseline()
    name = name or D.student_name(student, params, with_teacher=alpha < 1.0)
    return ctx.build(name, "distill", "kd", params, parent)


def finetune(ctx: ModelContext, text: str, opts: Any, name: str | None = None) -> Variant:
    """The torch variant ``lora-TEXT`` (or ``qlora-TEXT``): LoRA/QLoRA adapters trained on ``text`` and
    merged into the FP32 base (:mod:`deepship.pipeline.finetune`), built through the cache like any
    variant; :func:`carry_on` exports it (the GPT: the KV-cache graphs) and quantizes it.

    Args:
        text: a :data:`deepship.models.gpt.data.DOMAINS` name or a UTF-8 ``.txt`` path.
        opts: :class:`deepship.pipeline.finetune.LoraOptions`.

    Raises:
        InputSpecError: not a GPT decoder, or bad options; DataError: unreadable text.
    """
    from .pipeline import finetune as FT

    FT.validate(ctx, text, opts)
    method = "qlora" if opts.qlora else "lora"
    name = name or f"{method}-{Path(text).stem if text.endswith('.txt') else text}"
    return ctx.build(name, "finetune", method, FT.stage_params(text, opts), ctx.baseline())


def carry_on(ctx: ModelContext, source: Variant, quantize: Sequence[str] = ()) -> list[Variant]:
    """Export a torch variant (pruned, distilled) to ONNX with the parity check, then apply each
    quantize method: variants ``SOURCE-onnx`` and ``SOURCE-<method>``, returned in that order.

    Raises:
        StageError: an unknown quantize method; ExportError: export or parity failed.
    """
    for m in quantize:
        get_stage("quantize", m)
    return [ctx.build(n, stage, method, params, parent)
            for n, stage, method, params, parent in P.chain_entries(source.name, quantize, P.export_method(ctx))]


def publish(v: Variant, dest: str | Path) -> list[Path]:
    """Copy a variant's artifact out of the cache to ``dest`` (atomically): see
    :func:`deepship.pipeline.variants.publish`.

    Raises:
        OutputPathError: ``dest`` cannot be written.
    """
    return _publish(v, dest)


def tune(ctx: ModelContext, budget: "T.Budget", out_dir: str | Path, model_args: dict[str, Any],
         publish_to: str | Path | None = None, **kw: Any) -> dict[str, Any]:
    """Search for the fastest (or smallest) variant of ``ctx`` within ``budget``
    (:class:`deepship.pipeline.tune.Tuner`, outputs by :mod:`deepship.pipeline.recipe`; ``kw``: objective, batch, backends, time_budget_s, threads,
    ...), write ``tune.json``/``tune.md``/``tune.html``/``recipe.toml`` to ``out_dir`` and copy the
    chosen variant's files to ``publish_to`` (default ``OUT_DIR/model``).

    ``model_args`` is how the recipe loads the model again: ``{"ref": ..., "inputs": [...], ...}``
    (the arguments of :func:`load`).

    Returns:
        the tune result (see :meth:`deepship.pipeline.tune.Tuner.result`) with ``"files"`` added.

    Raises:
        StageError: no budget, an unknown backend or objective, a model without a metric for --max-drop.
    """
    res = T.Tuner(ctx, budget, **kw).run()
    files = R.write_outputs(res, out_dir, model_args)
    if res["chosen"]:
        dest = Path(publish_to) if publish_to is not None else Path(out_dir) / "model"
        files["model"] = dest
        _publish(ctx.get(res["chosen"]), dest)
    res["files"] = {k: str(v) for k, v in files.items()}
    return res


def build_recipe(path: str | Path, strict: bool = True) -> tuple[ModelContext, Variant, dict[str, Any], list[str]]:
    """Rebuild the variant a ``recipe.toml`` (written by :func:`tune`) describes.

    Returns:
        (the model's context, the variant, the recipe, warnings).

    Raises:
        StageError: unreadable recipe, a failing step, or (``strict``) a cache key that differs.
    """
    r = R.read_recipe(path)
    m = dict(r["model"])
    ctx = load(m.pop("ref"), **{k: v for k, v in m.items() if k in ("inputs", "weights", "data", "metric",
                                                                    "calibration_data", "train_data", "name")})
    v, warnings = R.build_recipe(ctx, r, strict=strict)
    return ctx, v, r, warnings


def report(models: Sequence[str | ModelSpec], out_dir: str | Path = "report", **kw: Any) -> dict:
    """Run :func:`deepship.pipeline.report.run_report` on model references or specs."""
    specs = [m if isinstance(m, ModelSpec) else resolve(m) for m in models]
    return run_report(specs, out_dir=out_dir, **kw)


def check(report_path: str | Path, baseline_path: str | Path, budgets: str | Path | None = None,
          max_drop: float | None = None, max_rel_drop: float | None = None,
          latency_tolerance: float | None = None, latency_floor_ms: float | None = None):
    """Run the CI gate; returns a :class:`deepship.pipeline.check.GateResult`."""
    r, b = load_report(report_path), load_report(baseline_path)
    flags = Budget(max_drop, max_rel_drop, latency_tolerance, latency_floor_ms)
    dflt, per_metric, per_variant = load_budgets(budgets, flags)
    # flags override the file's [default]
    dflt = Budget(*(getattr(flags, k) if getattr(flags, k) is not None else getattr(dflt, k) for k in BUDGET_KEYS))
    return _check(r, b, dflt, per_metric, per_variant)


def generate(model: str = "gpt", prompt: str | Sequence[int] = "", max_new_tokens: int = 64, variant: str = "fp32-onnx",
             speculative: bool = False, draft: str = "gpt-draft", k: int = 4, draft_variant: str | None = None,
             greedy: bool = True,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop: Sequence[str] = (), threads: int | None = 1) -> dict[str, Any]:
    """Generate text with a zoo decoder (``gpt``), with the KV cache, optionally by speculative decoding.

    Args:
        model: the decoder's zoo name.
        prompt: text, or token ids of the model's tokenizer.
        max_new_tokens: token limit (>= 1); generation also stops at the context length.
        variant: ``fp32-torch``, ``fp32-onnx``, ``int8-dynamic``, ``int4-b32``, ``int4-b128`` (aliases
            ``torch``, ``fp32``, ``int8``, ``int4``); built and cached on first use.
        speculative: draft with ``draft``, ``k`` tokens a round.
        draft_variant: the draft's variant (default :data:`deepship.pipeline.arch.gpt.DRAFT_VARIANT`, INT8
            dynamic; torch for a torch target).
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
    ctx = load(model)
    cfg = G.config_of(ctx.spec)
    ids = check_prompt(G.encode(prompt) if isinstance(prompt, str) else prompt, KVLayout.of(cfg))  # before any build
    sampling = Sampling(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    sampling.check(cfg.vocab_size)
    check_max_new_tokens(max_new_tokens)
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
    v = AG.build_variant(ctx, variant)
    runner = AG.variant_runner(ctx, v, threads=threads)
    draft_name = None
    if dctx is not None:
        dv = (dctx.baseline() if v.format == "torch" and draft_variant is None
              else AG.build_variant(dctx, draft_variant or AG.DRAFT_VARIANT))
        drunner = AG.variant_runner(dctx, dv, threads=threads)
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


#: short names accepted for the recognizer's variants (``optimize asr ... --variant``)
ASR_VARIANT_ALIASES = AA.VARIANT_ALIASES
#: the deployed variant: INT8 dynamic quantizes the LSTM too (static QDQ leaves it FP32), so it is the
#: smallest (1.4 MB against 1.9 MB) and kept FP32's CER on the held-out voices (benchmarks/asr.py)
ASR_DEPLOY_VARIANT = "int8-dynamic"



def asr_variant(ctx: ModelContext, variant: str) -> Variant:
    """Build (or reuse) a variant of the ``asr`` model: ``fp32-torch``, ``fp32-onnx``, ``int8-dynamic``,
    ``int8-static`` (aliases ``torch``, ``fp32``, ``onnx``, ``int8`` = ``int8-dynamic``).

    Raises:
        StageError: an unknown variant name.
    """
    return AA.asr_variant(ctx, variant)


def asr_bundle(out_dir: str | Path, variant: str = ASR_DEPLOY_VARIANT, measure: bool = True) -> dict[str, Any]:
    """Write the deployment bundle of the streaming recognizer to ``out_dir`` (atomically).

    The folder holds ``model.onnx`` (the chosen ONNX variant), ``features.json``, ``tokens.txt``,
    ``asr_stream.py`` (the runner: onnxruntime + numpy + kaldi-native-fbank only) and ``README.md``.
    With ``measure``, CER, real-time factor (1 thread) and per-chunk p50/p99 latency of the bundled
    model are measured on held-out voices and written into the README and ``features.json``.

    Returns:
        ``{"dir", "variant", "size_bytes" (model file), "bundle_bytes" (all files), **measurements}``.

    Raises:
        StageError: the variant is not an ONNX variant of ``asr``.
        OutputPathError: ``out_dir`` exists and is not a folder.
    """
    ctx = load("asr")
    v = asr_variant(ctx, variant)
    if v.format != "onnx":
        raise StageError(f"variant '{v.name}' is {v.format}; bundle an ONNX variant (fp32-onnx, int8-dynamic, int8-static)")
    dest = Path(out_dir)
    if dest.exists() and not dest.is_dir():
        raise OutputPathError(f"{dest} exists and is not a folder; give a folder for the bundle")
    meas: dict[str, Any] = {}
    if measure:
        sess = ctx.session(v, threads=1)
        meas = {"cer": round(AA.evaluate_cer(sess)["cer"], 4), **AA.measure_streaming(ctx, v, sess)}
    feats = {**A.feature_config(), "variant": v.name, "precision": v.precision, "measured": meas}
    with atomic_dir(dest) as tmp:
        shutil.copyfile(v.path, tmp / "model.onnx")
        (tmp / "features.json").write_text(json.dumps(feats, indent=1))
        (tmp / "tokens.txt").write_text("".join(f"{'<space>' if t == ' ' else t} {i}\n" for i, t in enumerate(feats["tokens"])))
        shutil.copyfile(asr_stream.__file__, tmp / "asr_stream.py")
        AA.char_lm().save(tmp / "lm.npz")
        m = (f"CER {meas['cer'] * 100:.2f}%, WER {meas['wer'] * 100:.2f}% on held-out sentences with unseen words; "
             f"CER {meas['cer_unseen_synth'] * 100:.2f}% on a synthesizer never heard in training (Flite); CER "
             f"{meas['cer_words'] * 100:.2f}% on isolated unseen words; RTF {meas['rtf_1thread']:.4f} (1 thread), "
             f"per-chunk p50 {meas['chunk_ms_p50']:.3f} ms / p99 {meas['chunk_ms_p99']:.3f} ms."
             if meas else "not measured (bundle built with --no-measure).")
        (tmp / "README.md").write_text(AA.BUNDLE_README.format(
            precision=v.precision.upper(), variant=v.name, size_kb=Path(v.path).stat().st_size / 1024,
            chunk_frames=feats["chunk_frames"], chunk_ms=feats["chunk_ms"], alg_ms=feats["algorithmic_latency_ms"],
            measured=m))
    files = sorted(dest.iterdir())
    return {"dir": str(dest), "variant": v.name, "size_bytes": (dest / "model.onnx").stat().st_size,
            "bundle_bytes": sum(f.stat().st_size for f in files), "files": [f.name for f in files], **meas}


def transcribe(audio: str | Path, variant: str = ASR_DEPLOY_VARIANT, stream: bool = False, beam: int = 0,
               threads: int = 1, on_partial: Callable[[str], None] | None = None, endpoint: bool = False,
               on_segment: Callable[[dict], None] | None = None, lm: bool = False) -> dict[str, Any]:
    """Transcribe an audio file (WAV/FLAC/OGG, any rate, mono or stereo) with the streaming recognizer.

    The file is read with ``soundfile``, mixed to mono and resampled to 16 kHz with ``soxr``, then
    streamed through the variant chunk by chunk (the model is always streaming; ``stream`` feeds it in
    100 ms pieces as a microphone would, reads the file block by block, which lifts the length
    limit, and calls ``on_partial`` with each changed partial transcript). ``endpoint`` (implies
    ``stream``) splits the audio at pauses (:class:`deepship.runtimes.asr_stream.Endpointer`) and
    calls ``on_segment`` with each utterance as it ends. ``lm`` fuses the character 4-gram LM into the
    beam search (:func:`deepship.pipeline.arch.asr.char_lm`; needs ``beam`` > 1).

    Returns:
        ``{"text", "seconds" (audio), "rtf" (compute / audio time), "chunks", "variant"}``, and with
        ``endpoint`` also ``"segments"``: ``[{"text", "start_s", "end_s"}]``.

    Raises:
        DataError: missing, unreadable or empty file, NaN samples, or longer than 600 s without ``stream``.
        StageError: unknown variant.
        InputSpecError: ``lm`` without a beam.
    """
    if lm and beam <= 1:
        raise InputSpecError("the language model rescores the beam search; add --beam 8 (any width > 1) to --lm")
    # the file is checked before anything is built
    stream = stream or endpoint
    samples = S.load_audio(audio) if not stream else S.check_audio_file(audio)
    v, sess = _asr_session(variant, threads)
    clm = AA.char_lm() if lm else None
    if endpoint:
        return _transcribe_endpointed(sess, v, audio, beam, on_partial, on_segment, clm)
    return _transcribe_one(sess, v, audio, samples, stream, beam, on_partial, clm)


def _transcribe_endpointed(sess: Any, v: Variant, audio: str | Path, beam: int, on_partial, on_segment,
                           lm: Any) -> dict[str, Any]:
    ep = Endpointer(sess, AA.stream_config(), beam=beam, lm=lm)
    t0, secs, last = time.perf_counter(), 0.0, ""
    for block in S.audio_blocks_16k(audio, seconds=0.1):
        secs += len(block) / S.SAMPLE_RATE
        segs = ep.accept_waveform(block, S.SAMPLE_RATE)
        for seg in segs:
            if on_segment is not None:
                on_segment(seg)
        if on_partial is not None and ep.partial_result() not in ("", last):
            last = ep.partial_result()
            on_partial(last)
    for seg in ep.finalize():
        if on_segment is not None:
            on_segment(seg)
    dt = time.perf_counter() - t0
    return {"text": " ".join(s["text"] for s in ep.segments), "segments": ep.segments, "seconds": round(secs, 3),
            "rtf": round(dt / secs, 4) if secs else None, "chunks": ep.chunks, "variant": v.name}


def _asr_session(variant: str, threads: int) -> tuple[Variant, Any]:
    ctx = load("asr")
    v = asr_variant(ctx, variant)
    return v, ctx.session(v, threads=threads)


def _transcribe_one(sess: Any, v: Variant, audio: str | Path, samples: Any, stream: bool, beam: int,
                    on_partial: Callable[[str], None] | None, lm: Any = None) -> dict[str, Any]:
    st = Stream(sess, AA.stream_config())
    t0 = time.perf_counter()
    if not stream:
        st.accept_waveform(samples, S.SAMPLE_RATE)
    else:
        last = ""
        for block in S.audio_blocks_16k(audio, seconds=0.1):
            st.accept_waveform(block, S.SAMPLE_RATE)
            if on_partial is not None and st.partial_result() != last:
                last = st.partial_result()
                on_partial(last)
    text = st.finalize(beam, lm)
    dt = time.perf_counter() - t0
    secs = st.audio_seconds
    return {"text": text, "seconds": round(secs, 3), "rtf": round(dt / secs, 4) if secs else None,
            "chunks": len(st.chunk_latencies_ms), "variant": v.name}


#: audio files a folder transcription reads (what soundfile reads)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def transcribe_folder(folder: str | Path, tsv: str | Path, variant: str = ASR_DEPLOY_VARIANT, beam: int = 0,
                      threads: int = 1, on_file: Callable[[dict], None] | None = None, lm: bool = False) -> list[dict[str, Any]]:
    """Transcribe every audio file (:data:`AUDIO_SUFFIXES`, sorted, not recursive) of ``folder`` with one
    loaded recognizer, and write ``tsv`` (atomically): columns ``file``, ``text``, ``seconds``,
    ``rtf``, ``error``. A file that cannot be read gets its one-line error in the ``error`` column
    and the others go on.

    Returns:
        one dict per file (:func:`transcribe`'s keys, ``file`` and ``error``); ``on_file`` is called
        with each as it is done.

    Raises:
        DataError: ``folder`` is not a folder or holds no audio file.
        StageError: unknown variant.
    """
    from .errors import DataError
    from .utils import atomic_file

    if lm and beam <= 1:
        raise InputSpecError("the language model rescores the beam search; add --beam 8 (any width > 1) to --lm")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; give a folder of audio files, or one file")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise DataError(f"{folder} holds no {'/'.join(x[1:].upper() for x in AUDIO_SUFFIXES)} file")
    v, sess = _asr_session(variant, threads)
    clm = AA.char_lm() if lm else None
    rows = []
    for f in files:
        try:
            row = {"file": f.name, **_transcribe_one(sess, v, f, S.load_audio(f), False, beam, None, clm), "error": ""}
        except DataError as e:
            row = {"file": f.name, "text": "", "seconds": None, "rtf": None, "error": str(e)}
        rows.append(row)
        if on_file is not None:
            on_file(row)
    cols = ("file", "text", "seconds", "rtf", "error")
    with atomic_file(Path(tsv)) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        w.writerows([("" if r[c] is None else r[c]) for c in cols] for r in rows)
    return rows
