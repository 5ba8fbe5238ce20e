"""Commands that build variants: ``models``, ``train``, ``export``, ``quantize``, ``engine``, ``prune``, ``distill``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import (BATCHES, CALIBRATION_DATA, DATA, INPUTS, MIN_TIME, MODEL_HELP, NAME, THREADS, TRAIN_DATA, WEIGHTS,
                      app, batch_sizes, err, load, out, stem, user_errors)


@app.command("models")
@user_errors
def models_cmd():
    """List the zoo."""
    from ..models.zoo import DEFAULT_SET, ZOO

    for name, mk in ZOO.items():
        s = mk()
        m = f"{s.metric.name} ({'higher' if s.metric.higher_is_better else 'lower'} is better)" if s.metric else "-"
        out.print(f"{name:6s} {'default' if name in DEFAULT_SET else '       '}  {m:28s} {s.description}", highlight=False)


@app.command("train")
@user_errors
def train_cmd(models: List[str] = typer.Argument(None, help="zoo names (default: all)"),
              out_dir: Optional[Path] = typer.Option(None, "--out", help="also write NAME.safetensors here "
                                                     "(deepship/models/weights to refresh the committed weights)")):
    """Run the seeded training recipes from scratch (--out writes the weights, tagged with the recipe hash)."""
    import json as _json

    from ..models import resolve
    from ..models.train import recipe_hash, save_weights, train_model
    from ..models.zoo import ZOO

    for name in models or list(ZOO):
        spec = resolve(name)
        model, stats = train_model(spec)
        msg = f"{name}: trained in {stats['train_s']:.1f} s"
        if out_dir:
            p = save_weights(model, Path(out_dir) / f"{name}.safetensors",
                             {"recipe_hash": recipe_hash(spec), "recipe": _json.dumps(spec.recipe)})
            msg += f" -> {p}"
        out.print(msg, highlight=False)


@app.command("export")
@user_errors
def export_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
               output: Optional[Path] = typer.Option(None, "-o", "--output", help="destination .onnx (default out/MODEL.onnx)"),
               opset: Optional[int] = typer.Option(None, help="ONNX default-domain opset (default 18; 17 for hf: "
                                                   "models, the opset ONNX Runtime's transformer fusions match)"),
               inputs: List[str] = INPUTS, weights: Optional[str] = WEIGHTS, name: Optional[str] = NAME):
    """Export to ONNX (dynamo exporter) and check parity against PyTorch at a second shape."""
    from .. import api
    from ..errors import OutputPathError
    from ..exporters.onnx import check_opset
    from ..utils import check_writable

    if opset is not None:
        check_opset(opset)
    ctx = load(model, inputs, weights, name=name)
    several = ctx.has_torch and ctx.arch.export_method != "onnx"  # a decoder: prefill + decode graphs
    if several and output is not None and output.suffix == ".onnx":
        raise OutputPathError(f"{model} exports several graphs (prefill.onnx, decode.onnx); give a folder with -o")
    dest = check_writable(output or Path("out") / (f"{stem(model, name)}-onnx" if several else f"{stem(model, name)}.onnx"))
    v = api.export(ctx, opset=opset)
    files = api.publish(v, dest)
    p = v.info["parity"]
    out.print(f"wrote {', '.join(map(str, files))} (opset {v.info['opset']}, {v.size_bytes():,} bytes)", highlight=False)
    for label in ("example", "second_shape"):
        q = p[label]
        out.print(f"parity at {q['shape']}: max abs {q['max_abs']:.3g}, max rel {q['max_rel']:.3g}", highlight=False)
    if "dynamic_dims" in v.info:
        dyn = "; ".join(f"{k}: {', '.join(f'axis {a}={n}' for a, n in d.items())}" for k, d in v.info["dynamic_dims"].items())
        out.print(f"dynamic dims: {dyn or 'none'}", highlight=False)
    if "parity_steps" in v.info:  # a decoder's KV-cache graphs (prefill + decode)
        s = v.info["parity_steps"]
        out.print(f"KV-cache graphs {', '.join(v.info.get('graphs', {}))}: {s['steps']} decode steps, max abs logits "
                  f"{s['max_abs_logits']:.3g}, same argmax {s['same_argmax']:.0%}", highlight=False)


@app.command("quantize")
@user_errors
def quantize_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
                 method: str = typer.Option(..., help="int8-dynamic | int8-static | fp16 | bf16 | int4-weight-only"),
                 calibration: str = typer.Option("minmax", help="int8-static: minmax | percentile | entropy"),
                 per_channel: bool = typer.Option(True, help="int8-static: per-channel weight scales"),
                 block_size: int = typer.Option(32, help="int4-weight-only: block size"),
                 output: Optional[Path] = typer.Option(None, "-o", "--output", help="destination (.onnx, or a folder for bf16)"),
                 inputs: List[str] = INPUTS, weights: Optional[str] = WEIGHTS, name: Optional[str] = NAME,
                 data: Optional[str] = DATA, calibration_data: Optional[str] = CALIBRATION_DATA,
                 train_data: Optional[str] = TRAIN_DATA):
    """Quantize a model and say which nodes were quantized."""
    from .. import api
    from ..pipeline.formatting import describe_nodes
    from ..pipeline.quantize import check_params
    from ..utils import check_writable

    params = {"calibration": calibration, "per_channel": per_channel} if method == "int8-static" else \
        {"block_size": block_size} if method == "int4-weight-only" else {}
    check_params(method, params)
    dest = check_writable(output or Path("out") / (f"{stem(model, name)}-{method}" + ("" if method == "bf16" else ".onnx")))
    ctx = load(model, inputs, weights, data, train_data=train_data, calibration_data=calibration_data, name=name)
    v = api.quantize(ctx, method, **params)
    files = api.publish(v, dest)
    parent = ctx.get(v.parent)
    out.print(f"wrote {', '.join(map(str, files))}: {v.size_bytes():,} bytes "
              f"({v.size_bytes() / max(parent.size_bytes(), 1):.2f}x of {parent.name})", highlight=False)
    out.print(describe_nodes(v.info.get("nodes", {})), highlight=False)
    if "calibration" in v.info:
        out.print(f"calibration: {v.info['calibration']} on {v.info.get('calibration_data')}", highlight=False)
    if v.info.get("warning"):
        err.print(f"warning: {v.info['warning']}", highlight=False)


@app.command("engine")
@user_errors
def engine_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
               backend: str = typer.Option("onnxruntime", help="onnxruntime | inductor (AOTInductor .pt2) | tensorrt | "
                                           "openvino"),
               precision: str = typer.Option("fp32", help="fp32 | fp16 | int8 | bf16 (backend permitting)"),
               shapes: Optional[str] = typer.Option(None, help="dynamic-dim ranges MIN/OPT/MAX for the batch, or "
                                                    "DIM=MIN/OPT/MAX,... (tensorrt profiles, inductor bounds)"),
               providers: Optional[str] = typer.Option(None, help="onnxruntime: execution providers in order, "
                                                       "e.g. tensorrt,cuda,cpu or auto (default cpu)"),
               strict: bool = typer.Option(False, help="onnxruntime: fail instead of falling back to another provider"),
               device: Optional[str] = typer.Option(None, help="inductor: cpu | cuda (default: cuda if present)"),
               calibration: Optional[str] = typer.Option(None, help="tensorrt int8: qdq (default) | entropy-calibrator"),
               hint: Optional[str] = typer.Option(None, help="openvino: latency (default) | throughput performance hint"),
               ignored: Optional[str] = typer.Option(None, help="openvino int8: node names NNCF keeps in float, NAME,..."),
               output: Optional[Path] = typer.Option(None, "-o", "--output", help="destination folder"),
               inputs: List[str] = INPUTS, weights: Optional[str] = WEIGHTS, name: Optional[str] = NAME,
               data: Optional[str] = DATA, calibration_data: Optional[str] = CALIBRATION_DATA,
               batches: str = typer.Option("1,32", help="batch sizes to time the engine and FP32 PyTorch at"),
               measure: bool = typer.Option(True, help="time the engine against FP32 PyTorch and print parity")):
    """Build an engine: ONNX Runtime (execution providers), AOTInductor package, TensorRT engine, or OpenVINO IR."""
    from .. import api
    from ..errors import StageError
    from ..pipeline.evaluate import compare_with_baseline
    from ..runtimes.engines import get_backend
    from ..runtimes.engines.tensorrt import parse_shapes
    from ..utils import check_writable

    ok, why = get_backend(backend).available()
    if not ok:
        raise StageError(why)
    rng = parse_shapes(shapes)
    bs = batch_sizes(batches)
    dest = check_writable(output or Path("out") / (f"{stem(model, name)}-{backend}-engine"
                                                   + ("" if precision == "fp32" else f"-{precision}")))
    ctx = load(model, inputs, weights, data, calibration_data=calibration_data, name=name)
    v = api.engine(ctx, backend, precision, shapes=rng or None, providers=providers, strict=strict or None,
                   device=device, calibration=calibration, hint=hint, ignored=ignored)
    files = api.publish(v, dest)
    prov = v.info.get("provider") or ", ".join(v.info.get("providers") or [])
    out.print(f"wrote {dest}/ ({', '.join(f.name for f in files)}; {v.size_bytes():,} bytes): {backend} engine, "
              f"{v.precision}, from {v.parent}, runs on {prov}", highlight=False)
    rec = v.info.get("provider_record")
    if rec and rec.get("fell_back"):
        err.print(f"warning: asked for {rec['requested'][0]} but ONNX Runtime ran {rec['ran']} "
                  f"(nodes per provider: {rec['node_placement']})", highlight=False)
    if v.info.get("warning"):
        err.print(f"warning: {v.info['warning']}", highlight=False)
    if measure and ctx.has_torch:
        c = compare_with_baseline(ctx, v, bs)
        d = c["drift"]
        out.print(f"parity against FP32 PyTorch on {c['samples']} ({c['data']}): max abs {d.get('max_abs', 0):.3g}, "
                  f"max rel {d.get('max_rel', 0):.3g}"
                  + (f", top-1 agreement {d['top1_agreement'] * 100:.1f}%" if "top1_agreement" in d else ""),
                  highlight=False)
        for b, t in c["latency_ms"].items():
            out.print(f"p50 at batch {b}: {t['engine']:.3f} ms against {t['fp32-torch']:.3f} ms for FP32 PyTorch "
                      f"({t['fp32-torch'] / t['engine']:.2f}x)", highlight=False)


@app.command("prune")
@user_errors
def prune_cmd(model: str = typer.Argument(..., help=MODEL_HELP),
              sparsity: str = typer.Option("0.5", help="fraction removed: of channels/hidden units per layer "
                                           "(structured) or of weights (unstructured); comma-separated for a sweep, "
                                           "e.g. 0.25,0.5,0.75"),
              structured: bool = typer.Option(True, "--structured/--unstructured",
                                              help="remove channels with torch-pruning (smaller, faster dense model) "
                                                   "or zero single weights (shrinks only the compressed size)"),
              importance: Optional[str] = typer.Option(None, help="l2 | l1 magnitude (default l2 structured, l1 "
                                                       "unstructured)"),
              finetune_steps: int = typer.Option(300, help="fine-tune optimizer steps on the model's training data "
                                                 "after pruning (0: none)"),
              quantize: Optional[str] = typer.Option(None, help="also quantize each pruned ONNX model: int8-static | "
                                                     "int8-dynamic | fp16 | int4-weight-only"),
              batches: str = BATCHES,
              threads: Optional[int] = THREADS,
              min_time: float = MIN_TIME,
              output: Optional[Path] = typer.Option(None, "-o", "--output", help="folder for the pruned models, "
                                                    "sweep.json and sweep.md (default out/MODEL-pruned)"),
              inputs: List[str] = INPUTS, weights: Optional[str] = WEIGHTS, name: Optional[str] = NAME,
              data: Optional[str] = DATA, train_data: Optional[str] = TRAIN_DATA,
              calibration_data: Optional[str] = CALIBRATION_DATA):
    """Prune (structured: torch-pruning; unstructured: global L1), fine-tune, export, and tabulate the sweep."""
    from ..pipeline import prune as P
    from ..pipeline.stages import get_stage
    from ..utils import check_writable, machine_info, write_json_atomic, write_text_atomic

    from ..errors import StageError

    method = "structured" if structured else "unstructured"
    values = P.parse_sparsities(sparsity)
    if importance is not None and importance not in P.IMPORTANCE_CRITERIA:
        raise StageError(f"unknown importance '{importance}'; use one of {', '.join(P.IMPORTANCE_CRITERIA)}")
    bs = batch_sizes(batches)
    if quantize:
        get_stage("quantize", quantize)
    dest = check_writable(output or Path("out") / f"{stem(model, name)}-pruned")
    ctx = load(model, inputs, weights, data, train_data=train_data, calibration_data=calibration_data, name=name)
    ctx.progress = lambda s: err.print(s, highlight=False)
    P.prunable(ctx, method)
    rows = P.sweep(ctx, values, method, importance or ("l2" if structured else "l1"), finetune_steps, quantize, bs,
                   threads, min_time, progress=lambda s: err.print(s, highlight=False))
    built = [ctx.get(n) for r in rows[1:] for n in (r["variant"], f"{r['variant']}-onnx")
             + ((f"{r['variant']}-{quantize}",) if quantize else ())]
    P.publish_variants(built, dest)
    write_json_atomic(dest / "sweep.json", {"model": ctx.spec.name, "method": method, "machine": machine_info(),
                                            "rows": P.rows_to_json(rows)})
    md = P.sweep_markdown(rows, ctx.spec, method)
    write_text_atomic(dest / "sweep.md", f"# {ctx.spec.name}: {method} pruning sweep\n\n{md}")
    print(md)
    for r in rows[1:]:
        v = ctx.get(r["variant"])
        msg = (f"{v.name}: {v.info['parameters_before']:,} -> {v.info['parameters']:,} parameters"
               if structured else f"{v.name}: {v.info['achieved_sparsity'] * 100:.0f}% of weights zeroed, "
               f"gzip {v.info['parent_gzip_bytes']:,} -> {v.info['gzip_bytes']:,} bytes")
        ft = v.info.get("finetune", {})
        msg += f"; fine-tuned {ft['steps']} steps" if "steps" in ft else f"; not fine-tuned ({ft.get('skipped')})"
        out.print(msg, highlight=False)
    if not structured:
        out.print("note: unstructured pruning keeps dense tensors: size on disk and dense latency do not change; only "
                  "the compressed size shrinks. Use --structured for a faster model.", highlight=False)
    out.print(f"wrote {dest}/ (models, sweep.json, sweep.md)", highlight=False)


@app.command("distill")
@user_errors
def distill_cmd(teacher: str = typer.Argument(..., help=MODEL_HELP),
                student: str = typer.Option("auto", help="auto (width 0.5) | a width such as 0.25 | width=0.5,layers=1 "
                                            "| sizes in the teacher's keys (c1=8,c2=16,fc=32; hidden=64x32) | "
                                            "package.module:factory"),
                temperature: float = typer.Option(4.0, help="softmax temperature tau of the soft targets"),
                alpha: float = typer.Option(0.1, help="weight of the label loss; 1 - alpha goes to matching the teacher"),
                epochs: Optional[int] = typer.Option(None, help="student training epochs (default: the teacher's "
                                                     "recipe; classifier students distill better trained 2-3x longer)"),
                compare: bool = typer.Option(False, "--compare/--no-compare",
                                             help="also train the same student without the teacher (alpha 1)"),
                quantize: Optional[str] = typer.Option(None, help="also quantize the student's ONNX model "
                                                       "(int8-static, int8-dynamic, fp16, int4-weight-only)"),
                batches: str = BATCHES,
                threads: Optional[int] = THREADS,
                min_time: float = MIN_TIME,
                output: Optional[Path] = typer.Option(None, "-o", "--output", help="folder for the student models, "
                                                      "distill.json and distill.md (default out/MODEL-distilled)"),
                inputs: List[str] = INPUTS, weights: Optional[str] = WEIGHTS, name: Optional[str] = NAME,
                data: Optional[str] = DATA, train_data: Optional[str] = TRAIN_DATA,
                calibration_data: Optional[str] = CALIBRATION_DATA):
    """Distill a smaller student (Hinton et al. 2015 for classifiers, MSE for regressors), export, compare."""
    from .. import api
    from ..pipeline import prune as P
    from ..pipeline.distill import distill_markdown
    from ..pipeline.stages import get_stage
    from ..utils import check_writable, machine_info, write_json_atomic, write_text_atomic

    bs = batch_sizes(batches)
    if quantize:
        get_stage("quantize", quantize)
    dest = check_writable(output or Path("out") / f"{stem(teacher, name)}-distilled")
    ctx = load(teacher, inputs, weights, data, train_data=train_data, calibration_data=calibration_data, name=name)
    ctx.progress = lambda s: err.print(s, highlight=False)
    v = api.distill(ctx, student, temperature, alpha, epochs)
    chain = api.carry_on(ctx, v, [quantize] if quantize else [])
    ctrl = api.distill(ctx, student, temperature, 1.0, epochs) if compare and alpha < 1.0 else None
    teacher_rows = [ctx.baseline(), api.export(ctx)] + ([api.quantize(ctx, quantize)] if quantize else [])
    rows = P.measure_variants(ctx, teacher_rows + [v] + chain + ([ctrl] if ctrl else []), bs, threads, min_time,
                              progress=lambda s: err.print(s, highlight=False))
    P.publish_variants([v] + chain + ([ctrl] if ctrl else []), dest)
    write_json_atomic(dest / "distill.json", {"model": ctx.spec.name, "machine": machine_info(),
                                              "student": v.info.get("student_arch"), "temperature": temperature,
                                              "alpha": alpha, "rows": P.rows_to_json(rows)})
    md = distill_markdown(rows, ctx.spec)
    write_text_atomic(dest / "distill.md", f"# {ctx.spec.name}: distillation\n\n{md}")
    print(md)
    out.print(f"student {v.info.get('student_arch')}: {v.info['parameters']:,} parameters "
              f"({v.info['param_ratio']:.2f}x the teacher's {v.info['teacher_parameters']:,})", highlight=False)
    out.print(f"wrote {dest}/ (models, distill.json, distill.md)", highlight=False)


@app.command("finetune")
@user_errors
def finetune_cmd(model: str = typer.Argument("gpt", help="a gpt-family decoder (gpt, gpt-draft), or asr (a voice's "
                                            "recordings)"),
                 lora: bool = typer.Option(True, "--lora/--no-lora", help="train LoRA adapters (Hu et al. 2021) "
                                           "on the frozen FP32 base"),
                 qlora: bool = typer.Option(False, "--qlora", help="QLoRA (Dettmers et al. 2023): the base's linear "
                                            "weights in NF4 with double quantization (bitsandbytes), adapters FP32"),
                 text: str = typer.Option("python-docs", "--train-data", help="the new text: python-docs (Debian "
                                          "python3.11-doc's tutorial) or a UTF-8 .txt file; last 10% held out. "
                                          "asr: a TSV of 'audio path<TAB>transcript' lines"),
                 eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="asr: held-out recordings of the "
                                                          "same voice (TSV) for CER before/after"),
                 rank: int = typer.Option(4, help="LoRA rank r"),
                 alpha: float = typer.Option(8.0, help="LoRA alpha (the update is scaled by alpha / r)"),
                 targets: Optional[str] = typer.Option(None, help="comma-separated linear layers to adapt "
                                                       "(default: the GPT's qkv,proj,fc; the recognizer's qkv,proj,pw1,pw2)"),
                 steps: int = typer.Option(300, help="optimizer steps"),
                 lr: float = typer.Option(2e-3, help="AdamW learning rate"),
                 batch_size: int = typer.Option(4, help="windows per step"),
                 seq_len: int = typer.Option(128, help="tokens per window"),
                 do_merge: bool = typer.Option(True, "--merge/--no-merge", help="also write merged.safetensors "
                                               "(QLoRA: merged into the de-quantized FP32 base)"),
                 full: bool = typer.Option(False, "--full-reference", help="also run a full fine-tune of the same "
                                           "steps, the reference for the adapter's numbers"),
                 threads: Optional[int] = THREADS,
                 output: Optional[Path] = typer.Option(None, "-o", "--output", help="folder for adapter/, "
                                                       "merged.safetensors and finetune.json (default out/MODEL-lora)")):
    """Adapt a decoder to new text with LoRA or QLoRA (Hugging Face PEFT); save the adapter in PEFT's format, merge."""
    from ..errors import InputSpecError
    from ..pipeline.finetune import LoraOptions, adapt_decoder
    from ..utils import check_writable

    if not lora and not qlora:
        raise InputSpecError("--no-lora leaves nothing to train; drop it, or pass --qlora")
    if model == "asr":
        return _finetune_asr(text, eval_data, rank, alpha, targets, steps, lr, batch_size, threads, output)
    opts = LoraOptions(rank=rank, alpha=alpha, targets=[t.strip() for t in (targets or "qkv,proj,fc").split(",") if t.strip()],
                       qlora=qlora, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, threads=threads)
    ctx = load(model, None, None, None)
    dest = check_writable(output or Path("out") / f"{stem(model, None)}-{'qlora' if qlora else 'lora'}")
    # adapt_decoder validates the model, options and text before it trains or writes anything
    r = adapt_decoder(ctx, text, opts, dest, do_merge=do_merge, full_reference=full,
                      progress=lambda s: err.print(s, highlight=False))
    b, a = r["before"], r["after"]
    out.print(f"{r['method']} rank {rank} on {', '.join(opts.targets)}: {r['train']['trainable_params']:,} trainable "
              f"({r['train']['trainable_share']:.2%}), {r['train']['s_per_step'] * 1e3:.0f} ms/step", highlight=False)
    out.print(f"held-out perplexity on {text}: {b['domain_ppl']:.1f} -> {a['domain_ppl']:.1f} "
              f"({r['domain_ppl_reduction']:.0%} lower); on Shakespeare {b['shakespeare_ppl']:.1f} -> "
              f"{a['shakespeare_ppl']:.1f}", highlight=False)
    out.print(f"base weights in memory {r['base_bytes_in_memory'] / 1e6:.2f} MB ({r['base_bytes_ratio']:.2f}x FP32); "
              f"adapter {r['adapter_bytes'] / 1e3:.0f} KB", highlight=False)
    if "merged" in r:
        out.print(f"merged: perplexity {r['merged']['domain_ppl']:.1f}, largest logit difference to the unmerged "
                  f"model {r['merged']['max_abs_logit_diff_vs_unmerged']:.2e}", highlight=False)
    out.print(f"wrote {dest}/ (adapter/, finetune.json{', merged.safetensors' if 'merged' in r else ''})", highlight=False)


def _finetune_asr(clips: str, eval_data: Optional[Path], rank: int, alpha: float, targets: Optional[str], steps: int,
                  lr: float, batch_size: int, threads: Optional[int], output: Optional[Path]) -> None:
    """``optimize finetune asr --train-data clips.tsv``: LoRA for one voice (deepship.pipeline.arch.asr_lora)."""
    from ..errors import InputSpecError
    from ..pipeline.finetune import LoraOptions
    from ..pipeline.arch.asr_lora import ASR_TARGETS, adapt_recognizer
    from ..utils import check_writable

    if not clips.endswith(".tsv"):
        raise InputSpecError(f"--train-data {clips}: the recognizer adapts to recordings; give a TSV of "
                             "'audio path<TAB>transcript' lines")
    tg = [t.strip() for t in targets.split(",") if t.strip()] if targets else list(ASR_TARGETS)
    opts = LoraOptions(rank=rank, alpha=alpha, targets=tg, steps=steps, lr=lr, batch_size=batch_size, threads=threads)
    dest = check_writable(output or Path("out") / "asr-lora")
    r = adapt_recognizer(load("asr", None, None, None), clips, opts, dest, eval_data,
                         progress=lambda s: err.print(s, highlight=False))
    b, a = r["before"], r["after"]
    out.print(f"lora rank {rank} on {', '.join(tg)}: {r['train']['trainable_params']:,} trainable "
              f"({r['train']['trainable_share']:.2%}); {r['clips_n']} clips, {r['train_audio_s']:.0f} s of audio; "
              f"{r['train']['train_s']:.0f} s", highlight=False)
    if b["voice"] is not None:
        out.print(f"CER on the voice's held-out clips: {b['voice'] * 100:.2f}% -> {a['voice'] * 100:.2f}%", highlight=False)
    out.print(f"CER on other voices (held-out sentences): {b['others'] * 100:.2f}% -> {a['others'] * 100:.2f}%; "
              f"adapter {r['adapter_bytes'] / 1e3:.0f} KB; wrote {dest}/ (adapter/, finetune.json)", highlight=False)
