"""The GPT family's adapter: the KV-cache export stage, head and MLP-width pruning, the report's rows
and decoding measures, and the decoder's variants and generation runners.

- ``("export", "onnx-kv")`` (torch -> onnx): :func:`deepship.exporters.kv.export_kv` (prefill and
  decode-step graphs sharing their weights), then parity of each graph at two shapes and over 32
  decode steps on held-out text (:func:`deepship.pipeline.parity.decode_parity`).
- ``("export", "onnx-kv-fused")`` (torch -> onnx): :func:`deepship.exporters.fused.export_fused` (one
  graph with ONNX Runtime's fused GroupQueryAttention and an in-place cache: the graph continuous
  batching serves), with the same 32-step parity.
- Pruning support for :class:`~deepship.models.gpt.GPT` (:func:`pruning_support`): whole attention
  heads and MLP units with torch-pruning.
- The report plan (:func:`plan`) and measures (:func:`report_measures`: prefill ms, decode tokens/s at
  batch 1 and 8, speculative decoding's acceptance rate and speedup with ``gpt-draft``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import StageError
from ...exporters.fused import FUSED_FILE, FUSED_OPSET, export_fused
from ...exporters.kv import DECODE_FILE, PREFILL_FILE, export_kv, flat_inputs, graph_spec
from ...exporters.onnx import DEFAULT_OPSET
from ...models.gpt import GPT, REPORT_PROMPT_TOKENS, GPTConfig, config_of, draft_spec, heldout_prompts
from ...models.spec import ModelSpec
from ...runtimes.generate import generate, speculative_generate
from ...runtimes.kvcache import KVLayout, make_runner
from ...runtimes.session import OrtSession, open_onnx
from .. import finetune as FT
from ..adapters import ArchAdapter, register_adapter
from ..context import ModelContext
from ..parity import PARITY_STEPS, decode_parity, parity
from ..prune import ArchSupport, register_architecture
from ..stages import register_stage
from ..variants import Variant

#: the new text of the report's LoRA rows (Debian python3.11-doc; the rows are left out where it is missing)
LORA_TEXT = "python-docs"

#: fine-tune steps after pruning the GPT in the report plan (about 0.3 s a step on 2 cores)
PRUNE_FINETUNE_STEPS = 300


def plan(spec: ModelSpec, default_plan: list) -> list:
    """The decoder's report rows: FP32 torch (baseline), FP32 ONNX (prefill + decode graphs with the KV
    cache), FP32 ONNX with fused attention (``fp32-onnx-fused``: the graph that continuous batching
    serves, :mod:`deepship.exporters.fused`), INT8 dynamic, INT4 weight-only with block sizes 32 and
    128; with ``pruned``, half the attention heads and MLP width removed (:func:`pruning_support`) and fine-tuned
    :data:`PRUNE_FINETUNE_STEPS` steps, carried on to ONNX with the KV cache and INT4; and LoRA adapters
    trained on :data:`LORA_TEXT` and merged (:mod:`deepship.pipeline.finetune`), carried on the same way
    (neither for the draft: a spec whose ``extra["draft"]`` is ``None``)."""
    pruned = spec.extra.get("draft") is not None
    rows = [("fp32-onnx", "export", "onnx-kv", {}, "fp32-torch"),
            ("fp32-onnx-fused", "export", "onnx-kv-fused", {}, "fp32-torch"),
            ("int8-dynamic", "quantize", "int8-dynamic", {}, "fp32-onnx"),
            ("int4-b32", "quantize", "int4-weight-only", {"block_size": 32}, "fp32-onnx"),
            ("int4-b128", "quantize", "int4-weight-only", {"block_size": 128}, "fp32-onnx")]
    if pruned:
        p = "pruned-structured-50"
        rows += [(p, "prune", "structured", {"sparsity": 0.5, "importance": "l2",
                                             "finetune_steps": PRUNE_FINETUNE_STEPS}, "fp32-torch"),
                 (f"{p}-onnx", "export", "onnx-kv", {}, p),
                 (f"{p}-int4-b32", "quantize", "int4-weight-only", {"block_size": 32}, f"{p}-onnx")]
        if FT.text_available(LORA_TEXT):  # LoRA on the Python tutorial, merged, carried on to the KV cache and INT4
            n = f"lora-{LORA_TEXT}"
            rows += [(n, "finetune", "lora", FT.stage_params(LORA_TEXT, FT.LoraOptions()), "fp32-torch"),
                     (f"{n}-onnx", "export", "onnx-kv", {}, n),
                     (f"{n}-int4-b32", "quantize", "int4-weight-only", {"block_size": 32}, f"{n}-onnx")]
    return rows


# ---- structured pruning: attention heads and MLP width ----------------------------------------------

def pruned_arch(model: GPT) -> dict:
    """The architecture of a (possibly pruned) GPT in :class:`GPTConfig` keys: ``n_head``,
    ``head_size``, ``d_mlp``.

    Raises:
        StageError: the blocks differ in heads or MLP width (``build(arch)`` needs one size for all).
    """
    heads = {b.attn.n_head for b in model.blocks}
    mlp = {b.fc.out_features for b in model.blocks}
    if len(heads) > 1 or len(mlp) > 1:
        raise StageError(f"the pruned GPT's blocks differ (heads {sorted(heads)}, MLP widths {sorted(mlp)}); "
                         "prune with the same ratio in every block (local pruning)")
    return {"n_head": heads.pop(), "head_size": model.blocks[0].attn.head_dim, "d_mlp": mlp.pop()}


def pruning_support():
    """How :mod:`deepship.pipeline.prune` prunes a :class:`GPT` (an ``ArchSupport``).

    Whole attention heads go (torch-pruning ``MetaPruner(num_heads=..., prune_num_heads=True,
    prune_head_dims=False, head_pruning_ratio=sparsity)``, heads ranked by the group magnitude of
    their q/k/v rows and ``proj`` columns) and MLP hidden units go at the same ratio; the residual width
    stays (the tied embedding is ignored, so the residual group is never pruned). The fused ``qkv``
    is split for tracing and fused again afterwards (:meth:`CausalSelfAttention.unfuse_qkv`), so the
    pruned model keeps the exported graphs' layout with ``n_head`` fewer heads in its KV cache.
    """
    def prepare(m: GPT) -> None:
        for b in m.blocks:
            b.attn.unfuse_qkv()

    def finish(m: GPT) -> None:
        for b in m.blocks:
            b.attn.fuse_qkv()
        m.cfg = GPTConfig.from_dict({**m.cfg.to_dict(), **pruned_arch(m)})

    def kwargs(m: GPT, sparsity: float) -> dict:
        heads = {lin: b.attn.n_head for b in m.blocks for lin in (b.attn.q, b.attn.k, b.attn.v)}
        return {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False,
                "head_pruning_ratio": float(sparsity), "ignored_layers": [m.tok_emb, m.pos_emb],
                "output_transform": lambda out: out[0]}  # the KV presents are not outputs to keep

    return ArchSupport(arch_of=pruned_arch, pruner_kwargs=kwargs, prepare=prepare, finish=finish)


def variant_config(ctx: Any, variant: Any) -> GPTConfig:
    """The :class:`GPTConfig` of a built variant: the spec's, with the architecture a prune stage
    recorded on the variant or one of its ancestors (``info["arch"]``) applied."""
    cfg = config_of(ctx.spec)
    arch = next((v.info["arch"] for v in ctx.lineage(variant) if (v.info or {}).get("arch")), None)
    return GPTConfig.from_dict({**cfg.to_dict(), **arch}) if arch else cfg


# ---- variants, runners and the report's extra measures ---------------------------------------------

#: the draft variant speculative decoding uses by default (``optimize generate --draft-variant``): the
#: draft's precision changes only which tokens it proposes, never the output, and the INT8 draft
#: measured 1.03-1.14x faster end to end than the FP32 one here (its weights are a quarter of the
#: bytes, so less of the target's data is evicted from the caches between calls; docs/gpt.md)
DRAFT_VARIANT = "int8-dynamic"

#: short names accepted for the decoder's variants (``optimize generate --variant``)
VARIANT_ALIASES = {"torch": "fp32-torch", "fp32": "fp32-onnx", "onnx": "fp32-onnx", "int8": "int8-dynamic",
                   "int4": "int4-b32"}


def variant_names() -> list[str]:
    """The decoder variants :func:`build_variant` knows (the draft's plan: no pruned rows)."""
    return ["fp32-torch"] + [e[0] for e in _variant_plan()]


def _variant_plan() -> list:
    return plan(draft_spec(), [])


def build_variant(ctx: Any, name: str) -> Any:
    """Build (or take from the cache) the decoder variant ``name`` and its parents.

    Args:
        ctx: a :class:`~deepship.pipeline.context.ModelContext` of ``gpt`` or ``gpt-draft``.
        name: ``fp32-torch``, ``fp32-onnx``, ``fp32-onnx-fused``, ``int8-dynamic``, ``int4-b32``, ``int4-b128`` or an alias
            (``torch``, ``fp32``, ``int8``, ``int4``).

    Raises:
        StageError: an unknown variant name.
    """
    return ctx.build_planned(VARIANT_ALIASES.get(name, name), _variant_plan())


def variant_runner(ctx: Any, variant: Any, session: Any = None, threads: int | None = None, mode: str = "auto"):
    """A :class:`~deepship.runtimes.kvcache.KVRunner` for a built decoder variant.

    ``mode="auto"`` gives the :class:`~deepship.runtimes.kvcache.ArrayKVRunner` (measured fastest on
    the CPU; see :func:`deepship.runtimes.kvcache.make_runner`). The ``prefill.onnx`` graph beside the
    main file, when the variant has one, runs the prompt (else the decode graph with an empty past does).
    """
    cfg = variant_config(ctx, variant)
    session = session or ctx.session(variant, threads=threads)
    prefill = None
    if variant.format == "onnx" and variant.dir and (Path(variant.dir) / "prefill.onnx").is_file():
        prefill = OrtSession(Path(variant.dir) / "prefill.onnx", threads=getattr(session, "threads", threads))
    return make_runner(session, KVLayout.of(cfg), prefill, mode=mode)


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def report_measures(ctx: Any, variant: Any, session: Any, new_tokens: int = 64, repeats: int = 3, k: int = 4) -> dict:
    """The decoder's extra report measures for one variant (the ModelSpec ``measure`` hook).

    Prompts are held-out windows of 64 tokens; generation is greedy with the KV cache.

    Returns:
        ``{"prefill_ms_b1": ms for the 64-token prompt at batch 1, "decode_tok_s_b1", "decode_tok_s_b8":
        tokens/s of the decode phase (all rows, prefill excluded) for 64 new tokens, "acceptance_rate":
        greedy speculative decoding with ``gpt-draft`` (its :data:`DRAFT_VARIANT` on 1 thread; torch
        draft for the torch variant) at k=4 over 4 prompts, "spec_tok_s_b1", "spec_speedup_b1": speculative tokens/s over
        plain KV-cache tokens/s at batch 1}``. Medians of ``repeats`` runs.
    """
    runner = variant_runner(ctx, variant, session)
    prompts = heldout_prompts(8, REPORT_PROMPT_TOKENS)
    out: dict[str, Any] = {}

    def prefill():
        runner.reset(1)
        runner.forward(prompts[:1])

    prefill()
    out["prefill_ms_b1"] = round(_median_time(prefill, 2 * repeats + 1) * 1e3, 3)
    for b in (1, 8):
        runs = [generate(runner, prompts[:b], new_tokens) for _ in range(repeats)]
        out[f"decode_tok_s_b{b}"] = round(float(np.median([r.decode_tok_s for r in runs])), 1)
    dctx = ModelContext(draft_spec())
    dv = dctx.baseline() if variant.format == "torch" else build_variant(dctx, DRAFT_VARIANT)
    # an ONNX draft on 1 thread whatever the report's count: at its size a second intra-op thread costs
    # more in per-operator synchronization than it adds (measured: speculative 0.99x plain with a
    # 2-thread draft, 1.50x with a 1-thread draft, both against a 2-thread target, 256 tokens). A torch
    # draft keeps the target's count (torch's thread count is process-wide).
    draft = variant_runner(dctx, dv, threads=1 if dv.format == "onnx" else getattr(session, "threads", None))
    speculative_generate(runner, draft, prompts[:1], 2 * k + 2, k=k)  # warm-up: the draft's proposal graph
    spec_runs = [speculative_generate(runner, draft, p[None], new_tokens, k=k) for p in prompts[:4]]
    plain_runs = [generate(runner, p[None], new_tokens) for p in prompts[:4]]
    out["acceptance_rate"] = round(sum(r.accepted for r in spec_runs) / max(1, sum(r.proposed for r in spec_runs)), 3)
    spec_tps = float(np.median([r.tokens_per_s for r in spec_runs]))
    plain_tps = float(np.median([r.tokens_per_s for r in plain_runs]))
    out["spec_tok_s_b1"] = round(spec_tps, 1)
    out["spec_speedup_b1"] = round(spec_tps / plain_tps, 2) if plain_tps else None
    out["spec_k"] = k
    return out


# ---- the onnx-kv export stage -----------------------------------------------------------------------

def check_kv_export(module: Any, cfg: GPTConfig, res: Any, prompt: np.ndarray | None = None,
                    steps: int = PARITY_STEPS) -> dict[str, Any]:
    """Parity of a KV-cache export (:class:`~deepship.exporters.kv.KVExportResult`) against ``module``:
    each graph at two shapes (:func:`deepship.pipeline.parity.parity`), then the prefill of ``prompt``
    (int64 ``(batch, seq)``, default 2 held-out prompts of 16 tokens) and ``steps`` decode steps
    (:func:`deepship.pipeline.parity.decode_parity`; 0 skips it).

    Returns:
        ``{"decode": {...}, "prefill": {...}, "steps": {...} | None}``.

    Raises:
        ExportError: a graph, an output or a step differs beyond the tolerance.
    """
    dspec, pspec = graph_spec(cfg, True), graph_spec(cfg, False)
    out = {"decode": parity(flat_inputs(module, [t.name for t in dspec.inputs]), dspec, res.decode),
           "prefill": parity(module, pspec, res.prefill), "steps": None}
    if steps:
        prompt = heldout_prompts(2, 16) if prompt is None else prompt
        out["steps"] = decode_parity(module, cfg, res.prefill, res.decode, prompt, steps=steps)
    return out


@register_stage("export", "onnx-kv-fused", "torch", "onnx")
def _export_fused_stage(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """torch -> one ONNX graph with GroupQueryAttention and an in-place fixed-size cache, parity over 32 steps."""
    module = ctx.torch_session(parent).module.eval()
    cfg = variant_config(ctx, parent)
    path = export_fused(module, cfg, out / FUSED_FILE)
    session = open_onnx(path, threads=1)  # a FusedSession: the plain decoder interface decode_parity drives
    steps = int(params.get("steps", PARITY_STEPS))
    par = decode_parity(module, cfg, session, session, heldout_prompts(2, 16), steps=steps) if steps else None
    return [path.name], {"opset": FUSED_OPSET, "parity_steps": par, "graphs": {"decode": FUSED_FILE},
                         "attention": "com.microsoft.GroupQueryAttention", "exporter": "deepship.exporters.fused (onnx.helper)"}


@register_stage("export", "onnx-kv", "torch", "onnx")
def _export_kv_stage(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """torch -> ONNX prefill + decode-step graphs with past_key_values/present, parity over 32 steps."""
    module = ctx.torch_session(parent).module.eval()
    cfg = variant_config(ctx, parent)  # a pruned parent has fewer heads / a narrower MLP
    res = export_kv(module, cfg, out, opset=int(params.get("opset", DEFAULT_OPSET)))
    par = check_kv_export(module, cfg, res, steps=int(params.get("steps", PARITY_STEPS)))
    files = [f.name for f in res.files]  # decode.onnx first: the main file, which quantization reads
    dec = {k: ({**v, "shape": _compact(v["shape"])} if isinstance(v, dict) and "shape" in v else v)
           for k, v in par["decode"].items()}
    return files, {"opset": res.opset, "parity": dec, "parity_prefill": par["prefill"], "parity_steps": par["steps"],
                   "graphs": {"decode": DECODE_FILE, "prefill": PREFILL_FILE}, "exporter": "torch.onnx.export(dynamo=True)"}


def _compact(shapes: dict) -> dict:
    """``{input: shape}`` with the ``2 * n_layer`` past inputs folded into one ``past_key_values.*`` entry."""
    out = {k: v for k, v in shapes.items() if not k.startswith("past_key_values.")}
    past = [v for k, v in shapes.items() if k.startswith("past_key_values.")]
    if past:
        out["past_key_values.*"] = past[0]
    return out


register_architecture(GPT, pruning_support())
register_adapter(ArchAdapter("gpt", plan=plan, measure=lambda ctx, v, s: report_measures(ctx, v, s)
                             if ctx.spec.extra.get("draft") is not None else None, export_method="onnx-kv"))
