"""The comparator: a built ONNX graph against its PyTorch source (the Polygraphy idea: runners behind
one interface, and a separate comparator that checks any two runners' outputs).

| function | what it runs | used by |
|---|---|---|
| :func:`parity` | every output at the example shape and at a second, different shape (random inputs, or ``feeds_at``) | the ``export`` stages |
| :func:`padded_parity` | :func:`parity` with padded token rows | Hugging Face encoders |
| :func:`decode_parity` | prefill then 32 decode steps, each runtime carrying its own KV cache | the ``onnx-kv`` export |

Tolerance: a graph fails when ``max_abs > atol + rtol * max|reference|`` for any output; the error
names the output, the input shapes and the likely cause.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import ExportError
from ..exporters.hf import padded_feeds
from ..models.spec import EXAMPLE_DIM_SIZES, SECOND_DIM_SIZES, ModelSpec
from ..runtimes.session import OrtSession, Session, TorchSession

#: decode steps :func:`decode_parity` runs after the prefill
PARITY_STEPS = 32


def parity(reference: Any, spec: ModelSpec, onnx_path: str | Path, atol: float = 1e-4, rtol: float = 1e-3,
           sizes: Mapping[str, int] | None = None, seed: int = 1,
           feeds_at: Callable[[Mapping[str, int] | None], dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Compare ONNX Runtime against the torch ``reference`` at the example shape and a second shape.

    ``feeds_at(sizes)`` makes the inputs at a shape (``None``: the example shape); default
    ``spec.example_inputs(sizes, seed=seed)`` (random inputs; e.g. padded token rows for encoders).

    Returns:
        ``{"example": {"shape", "max_abs", "max_rel", "ok"}, "second_shape": {...}, "ok": bool}``.
        ``max_rel`` is max abs error over max abs reference value.

    Raises:
        ExportError: outputs differ beyond ``atol + rtol * max|reference|`` (names the output and shape).
    """
    ort_s = OrtSession(onnx_path, threads=1)
    tor_s = TorchSession(reference, [t.name for t in spec.inputs], spec.output_names, threads=None)
    out: dict[str, Any] = {}
    for label, sz in (("example", None), ("second_shape", sizes or SECOND_DIM_SIZES)):
        feeds = feeds_at(sz) if feeds_at is not None else spec.example_inputs(sz, seed=seed)
        a = ort_s.run(feeds)
        b = tor_s.run(feeds)
        worst = {"max_abs": 0.0, "max_rel": 0.0}
        for name in spec.output_names:
            if name not in a or name not in b:
                continue
            x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
            if x.shape != y.shape:
                raise ExportError(f"ONNX output '{name}' has shape {x.shape}, PyTorch {y.shape} at input shapes "
                                  f"{ {k: v.shape for k, v in feeds.items()} }; a dim was likely fixed during export")
            err = float(np.abs(x - y).max()) if x.size else 0.0
            ref = float(np.abs(y).max()) if y.size else 0.0
            if err > atol + rtol * ref:
                raise ExportError(f"parity failed for output '{name}' at input shapes "
                                  f"{ {k: tuple(v.shape) for k, v in feeds.items()} }: max abs error {err:.3g} "
                                  f"> {atol + rtol * ref:.3g}; check for ops that differ between torch and ONNX")
            worst = {"max_abs": max(worst["max_abs"], err), "max_rel": max(worst["max_rel"], err / ref if ref else err)}
        out[label] = {"shape": {k: list(v.shape) for k, v in feeds.items()}, **worst, "ok": True}
    out["ok"] = True
    return out


def padded_parity(reference: Any, spec: ModelSpec, onnx_path: str | Path, atol: float = 1e-4,
                  rtol: float = 1e-3) -> dict[str, Any]:
    """:func:`parity` (example shape and a second shape, every output) with padded token rows
    (:func:`deepship.exporters.hf.padded_feeds`), so the attention mask is exercised; padding positions
    of ``last_hidden_state`` are compared too.

    Raises:
        ExportError: an output differs beyond ``atol + rtol * max|reference|`` or has another shape.
    """
    return parity(reference, spec, onnx_path, atol=atol, rtol=rtol,
                  feeds_at=lambda sz: padded_feeds(spec, sz or EXAMPLE_DIM_SIZES, seed=1))


def decode_parity(model: Any, cfg: Any, prefill: str | Path | Session, decode: str | Path | Session, prompt: np.ndarray,
                  steps: int = PARITY_STEPS, atol: float = 1e-4, rtol: float = 1e-3) -> dict[str, Any]:
    """PyTorch against ONNX Runtime: the prefill of ``prompt``, then ``steps`` decode steps.

    Each runtime carries its own KV cache; both get the same next token (the PyTorch argmax), so the
    comparison covers error accumulated through the cache. Logits and every present tensor are
    compared at every step.

    Args:
        prefill, decode: the two graphs' files (opened on 1 thread), or sessions with the plain decoder
            interface (the same one twice for a single graph, e.g. a
            :class:`~deepship.runtimes.kvpool.FusedSession`).
        prompt: int64 ``(batch, seq)`` token ids; ``seq + steps`` must fit the context.

    Returns:
        ``{"prompt_shape", "steps", "max_abs_logits", "max_abs_cache", "max_rel", "same_argmax", "ok"}``
        (``same_argmax``: fraction of steps whose argmax agrees).

    Raises:
        ExportError: a step's logits or cache differ beyond ``atol + rtol * max|reference|``.
    """
    import torch

    prompt = np.asarray(prompt, np.int64)
    pre, dec = (x if isinstance(x, Session) else OrtSession(x, threads=1) for x in (prefill, decode))
    past_names = [n for n in dec.input_names if n.startswith("past_key_values.")]
    present_names = [f"present.{n.split('.', 1)[1]}" for n in past_names]
    worst = {"logits": 0.0, "cache": 0.0, "rel": 0.0}
    agree = 0

    def compare(label: str, a: np.ndarray, b: np.ndarray, kind: str) -> None:
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            raise ExportError(f"{label}: ONNX shape {a64.shape} differs from PyTorch {b64.shape}; a dim was fixed in export")
        err = float(np.abs(a64 - b64).max()) if a64.size else 0.0
        ref = float(np.abs(b64).max()) if b64.size else 0.0
        if err > atol + rtol * ref:
            raise ExportError(f"KV-cache parity failed at {label}: max abs error {err:.3g} > {atol + rtol * ref:.3g}; "
                              "check the mask/position offset for the past length")
        worst[kind] = max(worst[kind], err)
        worst["rel"] = max(worst["rel"], err / ref if ref else err)

    with torch.inference_mode():
        t_out = model(torch.from_numpy(prompt))
        o_out = pre.run({"input_ids": prompt})
        compare("prefill logits", o_out["logits"], t_out[0].numpy(), "logits")
        t_cache = list(t_out[1:])
        o_cache = [o_out[n] for n in present_names]
        for n, a, b in zip(present_names, o_cache, t_cache):
            compare(f"prefill {n}", a, b.numpy(), "cache")
        nxt = t_out[0][:, -1].argmax(-1, keepdim=True)
        for step in range(steps):
            t_out = model(nxt, *t_cache)
            o_out = dec.run({"input_ids": nxt.numpy(), **dict(zip(past_names, o_cache))})
            compare(f"decode step {step + 1} logits", o_out["logits"], t_out[0].numpy(), "logits")
            t_cache = list(t_out[1:])
            o_cache = [o_out[n] for n in present_names]
            for n, a, b in zip(present_names, o_cache, t_cache):
                compare(f"decode step {step + 1} {n}", a, b.numpy(), "cache")
            agree += int((o_out["logits"][:, -1].argmax(-1) == t_out[0][:, -1].argmax(-1).numpy()).all())
            nxt = t_out[0][:, -1].argmax(-1, keepdim=True)
    return {"prompt_shape": list(prompt.shape), "steps": steps, "max_abs_logits": worst["logits"],
            "max_abs_cache": worst["cache"], "max_rel": worst["rel"], "same_argmax": agree / max(steps, 1), "ok": True}
