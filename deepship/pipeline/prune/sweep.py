"""The sparsity sweep (``optimize prune``): prune at each sparsity, export, quantize, evaluate and time
each; measuring, publishing and tabulating variants."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import StageError
from ...runtimes.benchmark import measure
from ...utils import ensure_dir, write_json_atomic
from ..context import ModelContext
from ..evaluate import bench_feeds, evaluate
from ..quantize import QUANT_DEFAULT_PARAMS
from ..variants import Variant, publish
from .stages import DEFAULT_FINETUNE_STEPS, export_method, variant_name
from .torch_pruning import gzip_size, why_not_structured


def sweep(ctx: ModelContext, sparsities: Sequence[float], method: str = "structured", importance: str = "l2",
          finetune_steps: int = DEFAULT_FINETUNE_STEPS, quantize: str | None = None, batches: Sequence[int] = (1, 32),
          threads: int | None = None, min_time_s: float = 0.5, source: Variant | None = None,
          progress: Callable[[str], None] | None = None) -> list[dict]:
    """Prune at each sparsity, export (parity-checked), optionally quantize; evaluate and time each.

    Args:
        sparsities: fractions in (0, 1); a row with sparsity 0 (the unpruned parent) comes first.
        method: ``structured`` or ``unstructured``.
        quantize: a quantize method applied after export (``int8-static``, ...), or ``None``.
        batches: batch sizes timed (samples per call).

    Returns:
        One dict per sparsity: ``sparsity``, ``variant``, ``parameters``, ``nonzero_parameters``,
        ``size_bytes`` (ONNX, bytes), ``gzip_bytes`` (ONNX, bytes), and per format (``torch``,
        ``onnx``, the quantize method) ``metric`` and ``latency_ms`` (``{batch: p50 ms}``).

    Raises:
        StageError: bad sparsity or method, or an architecture that cannot be pruned.
    """
    for s in sparsities:
        if not 0.0 < float(s) < 1.0:
            raise StageError(f"sparsity {s} is outside (0, 1); give fractions such as 0.25,0.5,0.75")
    variant_name(method, 0.5)
    parent = source or ctx.baseline()
    rows = []
    base_named = parent.stage == "baseline"
    for s in [0.0] + [float(x) for x in sparsities]:
        if s == 0.0:
            tv = parent
        else:
            name = variant_name(method, s) if base_named else f"{parent.name}-{variant_name(method, s)}"
            tv = ctx.build(name, "prune", method,
                           {"sparsity": s, "importance": importance, "finetune_steps": int(finetune_steps)}, parent)
        ov = ctx.build("fp32-onnx" if tv.stage == "baseline" else f"{tv.name}-onnx", "export", export_method(ctx),
                       {}, tv)
        chain = [("torch", tv), ("onnx", ov)]
        if quantize:
        
            qname = quantize if tv.stage == "baseline" else f"{tv.name}-{quantize}"
            chain.append((quantize, ctx.build(qname, "quantize", quantize, dict(QUANT_DEFAULT_PARAMS.get(quantize, {})), ov)))
        row: dict[str, Any] = {"sparsity": s, "variant": tv.name, "parameters": tv.info.get("parameters"),
                               "nonzero_parameters": tv.info.get("nonzero_parameters", tv.info.get("parameters")),
                               "size_bytes": ov.size_bytes(), "gzip_bytes": gzip_size([Path(ov.dir) / f for f in ov.files]),
                               "metric": {}, "latency_ms": {}}
        measured = measure_variants(ctx, [v for _, v in chain], batches, threads, min_time_s, progress)
        for (label, _), m in zip(chain, measured):
            row["metric"][label] = m["metric"]
            row["latency_ms"][label] = m["latency_ms"]
        if quantize:
            row["size_bytes_" + quantize] = chain[-1][1].size_bytes()
        rows.append(row)
    return rows


def measure_variants(ctx: ModelContext, variants: Sequence[Variant], batches: Sequence[int] = (1, 32),
                     threads: int | None = None, min_time_s: float = 0.5,
                     progress: Callable[[str], None] | None = None) -> list[dict]:
    """Evaluate (held-out metric) and time (p50 ms per batch size) each variant, as the report does.

    Returns:
        One dict per variant: ``variant``, ``parent``, ``format``, ``parameters``, ``size_bytes``,
        ``metric``, ``metric_change`` (against the first variant), ``latency_ms`` ``{batch: p50 ms}``.
    """

    say = progress or (lambda s: None)
    rows, ref = [], None
    for v in variants:
        say(f"measuring {v.name}")
        sess = ctx.session(v, threads=threads)
        m = evaluate(ctx, sess, None)["metric"]
        ref = m if ref is None else ref
        rows.append({"variant": v.name, "parent": v.parent, "format": v.format, "parameters": v.info.get("parameters"),
                     "size_bytes": v.size_bytes(), "metric": m,
                     "metric_change": None if m is None or ref is None else m - ref,
                     "latency_ms": {str(b): measure(sess, bench_feeds(ctx, b), min_time_s=min_time_s, batch=b).p50_ms
                                    for b in batches}})
    return rows


def publish_variants(variants: Sequence[Variant], dest: str | Path) -> list[Path]:
    """Copy variants out of the cache into the folder ``dest``: ONNX ones as ``NAME.onnx``, torch ones
    as a folder ``NAME/`` with their weights (or ``.pt2``) and ``variant.json`` (architecture, stage
    parameters, what the stage measured). Written atomically.

    Raises:
        OutputPathError: ``dest`` cannot be written.
    """

    dest = ensure_dir(dest)
    written: list[Path] = []
    for v in variants:
        if v.format == "onnx":
            written += publish(v, dest / f"{v.name}.onnx")
        else:
            written += publish(v, dest / v.name)
            written.append(write_json_atomic(dest / v.name / "variant.json", {**v.to_dict(), "dir": None}))
    return written


def sweep_markdown(rows: list[dict], spec: Any, method: str = "structured") -> str:
    """The sweep as a Markdown table: sparsity against parameters, size, metric and p50 latency."""
    if not rows:
        return ""
    labels = list(rows[0]["metric"])
    batches = list(next(iter(rows[0]["latency_ms"].values())))
    met = spec.metric
    scale = met.scale if met else 1.0
    mname = met.name if met else "metric"
    hdr = ["sparsity", "parameters", "nonzero", "ONNX size", "ONNX gzip"] + [f"{mname} {l}" for l in labels] + \
          [f"p50 ms b{b} {l}" for b in batches for l in labels]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        cells = [f"{r['sparsity']:.2f}", f"{r['parameters']:,}", f"{r['nonzero_parameters']:,}",
                 f"{r['size_bytes']:,} B", f"{r['gzip_bytes']:,} B"]
        cells += ["-" if r["metric"][l] is None else f"{r['metric'][l] * scale:.2f}" for l in labels]
        cells += [f"{r['latency_ms'][l][b]:.3f}" for b in batches for l in labels]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("Structured pruning removes channels: size and dense latency fall." if method == "structured" else
            "Unstructured pruning zeroes weights in dense tensors: size on disk and dense latency do not change; "
            "only the gzip-compressed size shrinks.")
    return "\n".join(lines) + "\n\n" + note + "\n"


_SPARSITY_RE = re.compile(r"^\s*\d*\.?\d+\s*(,\s*\d*\.?\d+\s*)*$", re.ASCII)  # ASCII: float() refuses e.g. \x1f


def parse_sparsities(text: str) -> list[float]:
    """``"0.25,0.5,0.75"`` -> ``[0.25, 0.5, 0.75]``.

    Raises:
        StageError: not comma-separated fractions in (0, 1).
    """
    if not _SPARSITY_RE.match(text or ""):
        raise StageError(f"bad --sparsity '{text}'; give fractions in (0, 1) such as 0.5 or 0.25,0.5,0.75")
    vals = [float(x) for x in text.split(",")]
    bad = [v for v in vals if not 0.0 < v < 1.0]
    if bad:
        raise StageError(f"sparsity {bad[0]} is outside (0, 1); give fractions such as 0.25,0.5,0.75")
    return vals


def prunable(ctx: ModelContext, method: str = "structured", source: Variant | None = None) -> None:
    """Check up front that ``ctx``'s model (or its torch variant ``source``) can be pruned with ``method``.

    Raises:
        StageError: the model is ONNX-only, ``source`` is not a torch variant, the method is unknown,
            or the architecture cannot be pruned structurally (the message says why).
    """
    variant_name(method, 0.5)
    if not ctx.has_torch:
        raise StageError(f"cannot prune '{ctx.spec.name}': it is an ONNX file and pruning works on the torch model; "
                         "give the torch model (zoo name, package.module:factory)")
    if source is not None and source.format != "torch":
        raise StageError(f"cannot prune '{source.name}': it is {source.format}; prune the torch model, then export")
    if method == "structured":
        # the architecture is all that matters here: an untrained module avoids loading (or training) weights
        module = ctx.fresh_module() if source is None or source.stage == "baseline" else ctx.torch_session(source).module
        why = why_not_structured(module)
        if why:
            raise StageError(f"cannot prune '{ctx.spec.name}' structurally: {why}; use --unstructured")


def rows_to_json(rows: list[dict]) -> list[dict]:
    """The sweep rows with NumPy scalars made plain (for JSON)."""
    def conv(o):
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, np.generic):
            return o.item()
        return o

    return [conv(r) for r in rows]
