"""The Hugging Face family's adapter (``bert`` and ``hf:PATH``): Optimum export with padded-row parity,
the encoder report plan (fusions, INT8 recipes with layers kept FP32) and the sentence metrics.

Metrics: each variant's embeddings of the corpus and queries (:func:`embed`, sorted by length and padded
per batch) against the FP32 PyTorch embeddings (:func:`fp32_reference`, memoized per model):
mean and minimum cosine, recall@1 of nearest neighbours (:func:`deepship.models.hf.embedding_metrics`).
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...exporters.hf import HF_OPSET, export_hf
from ...models.hf import EVAL_BATCH, embedding_metrics, sentences, tokenize
from ...models.spec import ModelSpec
from ...runtimes.session import TorchSession
from ..adapters import ArchAdapter, register_adapter
from ..context import ModelContext
from ..parity import padded_parity

#: The report plan for ``bert`` (see docs/bert.md and benchmarks/minilm.py for the sweep behind it):
#: PyTorch BF16, Optimum FP32 export, ORT transformer fusions, plain dynamic INT8 (unfused and fused: the fastest,
#: below the accuracy bars), and the best INT8 recipe: static QDQ, per-channel weights, MinMax on 256
#: calibration sentences, with the feed-forward layers (intermediate and output dense) kept in FP32
#: (mean cosine 0.9992, recall@1 0.954 on this corpus; the fastest recipe meeting both bars here).
BERT_BEST_INT8 = ("int8-static-keep-ffn", "quantize", "int8-transformer",
                  {"mode": "static", "per_channel": True, "exclude": [r"/layer\.\d+/output/dense", r"/intermediate/dense"]},
                  "fp32-fused")
BERT_PLAN: list[tuple[str, str, str, dict, str]] = [
    # PyTorch BF16: the fast path on CPUs with AMX (4.6x FP32 there, see the field notes); emulated and
    # slow on CPUs without it, which the report then shows
    ("bf16-torch", "quantize", "bf16", {}, "fp32-torch"),
    ("fp32-onnx", "export", "onnx", {}, "fp32-torch"),
    ("fp32-fused", "optimize", "ort-transformers", {}, "fp32-onnx"),
    ("int8-dynamic", "quantize", "int8-transformer", {"mode": "dynamic"}, "fp32-onnx"),
    ("int8-fused-dynamic", "quantize", "int8-transformer", {"mode": "dynamic"}, "fp32-fused"),
    BERT_BEST_INT8,
]


def plan(spec: ModelSpec, default_plan: list) -> list:
    """The encoders' report plan (:data:`BERT_PLAN`), for ``bert`` and any ``hf:PATH`` model."""
    return list(BERT_PLAN)


def export(ctx: ModelContext, module: Any, params: dict, out: Path) -> tuple[list[str], dict]:
    """``export/onnx`` for an encoder: Optimum (deepship's exporter as the fallback), then parity with
    padded token rows at two shapes."""
    res, how = export_hf(module, ctx.spec, out / "model.onnx", opset=int(params.get("opset", HF_OPSET)),
                         force_fallback=bool(params.get("fallback", False)))
    res.parity = padded_parity(module, ctx.spec, res.path)
    return [f.name for f in res.files], {"opset": res.opset, "parity": res.parity, "dynamic_dims": res.dynamic_dims,
                                         **how}


def embed(session: Any, path: str | Path, texts: Sequence[str], batch: int = EVAL_BATCH) -> np.ndarray:
    """Sentence embeddings float32 (n, H) from any deepship Session (torch or ONNX Runtime): batches of
    ``batch`` sentences sorted by length, each padded to its own longest sentence (not to 128)."""
    order = np.argsort([len(s) for s in texts], kind="stable")
    out: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    for i in range(0, len(texts), batch):
        idx = order[i:i + batch]
        feeds = tokenize(path, [texts[j] for j in idx])
        res = session.run(feeds)
        e = res["sentence_embedding"] if "sentence_embedding" in res else next(iter(res.values()))
        for j, row in zip(idx, np.asarray(e, np.float32)):
            out[j] = row
    return np.stack(out)


_REFS: dict[str, np.ndarray] = {}


def fp32_reference(spec: ModelSpec) -> np.ndarray:
    """FP32 PyTorch embeddings of corpus + queries, memoized per process by the model's identity."""
    ident = spec.extra["identity"]
    if ident not in _REFS:
        s = sentences()
        sess = TorchSession(spec.build(), ["input_ids", "attention_mask"], ["sentence_embedding", "last_hidden_state"])
        _REFS[ident] = embed(sess, spec.extra["path"], s["corpus"] + s["queries"])
    return _REFS[ident]


#: per session, its sentence metrics (the report's metric and notes ask for the same embeddings)
_METRICS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def sentence_metrics(ctx: ModelContext, session: Any) -> dict[str, float]:
    """``cosine``, ``min_cosine`` and ``recall@1`` of ``session`` against FP32 (computed once per session)."""
    if session not in _METRICS:
        s = sentences()
        emb = embed(session, ctx.spec.extra["path"], s["corpus"] + s["queries"])
        _METRICS[session] = embedding_metrics(emb, fp32_reference(ctx.spec), len(s["corpus"]))
    return _METRICS[session]


def measure(ctx: ModelContext, variant: Any, session: Any) -> dict | None:
    """Report notes: mean cosine, recall@1 and min cosine (``None`` for a spec without the corpus)."""
    if ctx.spec.metric is None:
        return None
    m = sentence_metrics(ctx, session)
    return {"mean cosine": round(m["cosine"], 5), "recall@1": round(m["recall@1"], 4),
            "min cosine": round(m["min_cosine"], 4)}


def evaluate(ctx: ModelContext, session: Any) -> float | None:
    """The metric: mean cosine to the FP32 embeddings (``None`` for a spec without the corpus)."""
    return sentence_metrics(ctx, session)["cosine"] if ctx.spec.metric is not None else None


register_adapter(ArchAdapter("hf", plan=plan, export=export, measure=measure, evaluate=evaluate))
