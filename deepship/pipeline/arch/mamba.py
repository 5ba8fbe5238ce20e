"""The Mamba family's adapter: report rows, the step graph (exported, parity-checked and cached per
model) and the report's streaming-generation measure (tokens/s through the step graph)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ExportError
from ...exporters.mamba import export_step_graph
from ...models import gpt
from ...models.mamba import Mamba, StepGraph, config_of, state_names, step_spec, stream_logits
from ...models.spec import ModelSpec
from ...runtimes.session import OrtSession, TorchSession
from ...utils import atomic_dir, cache_root, stable_hash
from ..adapters import ArchAdapter, register_adapter
from ..parity import parity


def step_session_torch(model: Mamba, threads: int | None = None):
    """A :class:`~deepship.runtimes.session.TorchSession` running ``model.step`` with the step graph's names."""
    spec = step_spec(model.cfg)
    return TorchSession(StepGraph(model).eval(), [t.name for t in spec.inputs], spec.output_names, threads=threads)




def step_parity(step_session: Any, model: Mamba, ids: np.ndarray) -> dict[str, Any]:
    """Compare the step graph streamed over ``ids`` (int64 ``(batch, n)``) with the whole-sequence torch
    logits, and its final states with :meth:`Mamba.prefill`'s.

    Returns:
        ``{"steps": n, "max_abs_logits", "max_abs_state", "same_argmax": fraction}``.
    """
    logits, st = stream_logits(step_session, model.cfg, ids)
    with torch.no_grad():
        ref = model.prefill(torch.from_numpy(np.asarray(ids, np.int64)))
    ref_logits = ref[0].numpy()
    ref_states = dict(zip(state_names(model.cfg), (t.numpy() for t in ref[1:])))
    return {"steps": int(ids.shape[1]), "max_abs_logits": float(np.abs(logits - ref_logits).max()),
            "max_abs_state": max(float(np.abs(st[n] - ref_states[n]).max()) for n in ref_states),
            "same_argmax": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())}


def plan(spec: ModelSpec, default_plan: list) -> list:
    """Report rows: FP32 torch (baseline), FP32 ONNX, INT8 dynamic, INT4 weight-only (MatMulNBits, block 32)."""
    return [("fp32-onnx", "export", "onnx", {}, "fp32-torch"),
            ("int8-dynamic", "quantize", "int8-dynamic", {}, "fp32-onnx"),
            ("int4-b32", "quantize", "int4-weight-only", {"block_size": 32}, "fp32-onnx")]


def _step_graph_path(ctx: Any) -> Path:
    return cache_root() / "mamba" / f"step-{stable_hash([ctx.identity(), 'step', 1])}" / "step.onnx"


def step_graph(ctx: Any) -> Path:
    """The FP32 step graph of a ``mamba`` :class:`~deepship.pipeline.context.ModelContext`, exported and
    checked (:func:`check_step_graph`) on first use and cached under ``$DEEPSHIP_CACHE/mamba``.

    Raises:
        ExportError: the export or a parity check failed (nothing is cached then).
    """
    p = _step_graph_path(ctx)
    if not p.is_file():
        with atomic_dir(p.parent) as d:
            res = export_step_graph(ctx.module(), d / p.name)
            check_step_graph(ctx.module(), res.path)
    return p


def check_step_graph(model: Mamba, path: Path, steps: int = 32, atol: float = 1e-4) -> dict[str, Any]:
    """Parity of an exported step graph: against ``model.step`` at batch 2 and 3 on random states
    (:func:`deepship.pipeline.parity.parity`), then ``steps`` tokens of held-out text (2 rows) streamed
    through ONNX Runtime against the whole-sequence torch forward (:func:`step_parity`).

    Returns:
        ``{"parity": two-shape parity, "steps": step parity}``.

    Raises:
        ExportError: either check failed (> ``atol``).
    """
    par = parity(StepGraph(model.eval()).eval(), step_spec(model.cfg), path, atol=atol)
    held = gpt.corpus()[1]
    ids = np.stack([held[:steps], held[1000:1000 + steps]])
    sp = step_parity(OrtSession(path, threads=1), model, ids)
    sp["ok"] = sp["max_abs_logits"] <= atol and sp["max_abs_state"] <= atol
    if not sp["ok"]:
        raise ExportError(f"step-graph parity failed over {steps} tokens: max abs logits {sp['max_abs_logits']:.3g}, "
                          f"states {sp['max_abs_state']:.3g} > {atol:g}")
    return {"parity": par, "steps": sp}


def report_measures(ctx: Any, variant: Any, session: Any, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Extra report measures (the adapter's ``measure``), for the FP32 torch and FP32 ONNX rows:
    greedy streaming generation through the step graph (torch ``step`` or the ONNX step graph) after a
    64-token held-out prompt, batch 1.

    Returns:
        ``{"step_tok_s_b1": generated tokens/s (prompt streaming excluded), median of ``repeats``}``, or
        ``{}`` for other variants.
    """
    if variant.name not in ("fp32-torch", "fp32-onnx"):
        return {}
    cfg = config_of(ctx.spec)
    threads = getattr(session, "threads", None)
    if variant.format == "torch":
        sess = step_session_torch(ctx.module(), threads=threads)
    else:
        sess = OrtSession(step_graph(ctx), threads=threads)
    prompt = gpt.heldout_prompts(1, gpt.REPORT_PROMPT_TOKENS)
    _, st = stream_logits(sess, cfg, prompt)
    rates = []
    for _ in range(repeats):
        nxt = prompt[:, -1:]
        s = dict(st)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            res = sess.run({"input_ids": nxt, **s})
            s = {n: res["next_" + n] for n in state_names(cfg)}
            nxt = res["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        rates.append(new_tokens / (time.perf_counter() - t0))
    return {"step_tok_s_b1": round(float(np.median(rates)), 1)}


register_adapter(ArchAdapter("mamba", plan=plan, measure=report_measures))
