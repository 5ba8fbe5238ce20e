"""Decoder export with an explicit KV cache: a prefill graph and a decode-step graph.

Both graphs come from one module (:class:`deepship.models.gpt.GPT`, ``forward(input_ids, *past)``)
through :func:`deepship.exporters.onnx.export_onnx` (dynamo exporter, named dynamic dims checked,
parity at two shapes), with the input/output names Optimum and ONNX Runtime GenAI use:

| graph | inputs | outputs |
|---|---|---|
| ``prefill.onnx`` | ``input_ids`` int64 ``[batch, seq]`` | ``logits`` float32 ``[batch, seq, vocab]``, ``present.{i}.key/value`` float32 ``[batch, heads, seq, head_dim]`` |
| ``decode.onnx`` | ``input_ids`` int64 ``[batch, seq]``, ``past_key_values.{i}.key/value`` float32 ``[batch, heads, past, head_dim]`` | ``logits`` ``[batch, seq, vocab]``, ``present.{i}.key/value`` ``[batch, heads, past + seq, head_dim]`` |

``batch``, ``seq`` and ``past`` are dynamic; the decode graph also accepts ``past = 0`` (an empty
cache) and ``seq > 1`` (the verification pass of speculative decoding). On top of the two-shape parity
of each graph, :func:`decode_parity` runs PyTorch and ONNX Runtime side by side on real held-out
tokens: the prefill, then ``steps`` (32) consecutive decode steps where each runtime carries its own
cache forward, comparing logits and the whole present cache at every step.

Importing this module registers the ``("export", "onnx-kv")`` stage (torch -> onnx) that the ``gpt``
zoo entry's report plan uses; its artifact holds ``decode.onnx`` (the main file, which quantization
stages consume), ``prefill.onnx`` and ``weights.bin``: the weights, stored once as external data
that both graphs point into (:func:`share_weights`), so the FP32 artifact is not twice the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from ..models.spec import ModelSpec
from .onnx import DEFAULT_OPSET, export_onnx

DECODE_FILE = "decode.onnx"
PREFILL_FILE = "prefill.onnx"
WEIGHTS_FILE = "weights.bin"  # external data shared by both graphs
PARITY_STEPS = 32


@dataclass
class KVExportResult:
    """Result of :func:`export_kv`.

    Attributes:
        decode, prefill: the two ``.onnx`` files.
        files: every file written (external data included).
        parity: ``{"decode": {...}, "prefill": {...}}`` two-shape parity of each graph (see
            :func:`deepship.exporters.onnx.parity`), and ``"steps"``: the :func:`decode_parity` result.
        opset: default-domain opset.
    """

    decode: Path
    prefill: Path
    files: list[Path]
    opset: int
    parity: dict[str, Any] = field(default_factory=dict)


def flat_inputs(module: Any, names: list[str]) -> Any:
    """An ``nn.Module`` calling ``module(*args)`` whose ``forward`` signature lists ``names``."""
    import inspect

    import torch

    class _Flat(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

            def forward(*args):
                return self.inner(*args)

            forward.__signature__ = inspect.Signature(
                [inspect.Parameter(n.replace(".", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
            self.forward = forward

    return _Flat(module).eval()


def graph_spec(cfg: Any, past: bool, name: str = "gpt") -> ModelSpec:
    """The :class:`ModelSpec` (inputs, named dynamic dims, output names) of the decode-step graph
    (``past=True``) or of the prefill graph, for a :class:`~deepship.models.gpt.GPTConfig`."""
    from ..models.gpt import input_specs, output_names

    return ModelSpec(name=name, task="language-modeling", build=None, inputs=input_specs(cfg, past=past),
                     output_names=output_names(cfg))


def export_kv(model: Any, cfg: Any, out_dir: str | Path, opset: int = DEFAULT_OPSET, steps: int = PARITY_STEPS,
              prompt: np.ndarray | None = None, atol: float = 1e-4, rtol: float = 1e-3) -> KVExportResult:
    """Export ``model`` as ``out_dir/prefill.onnx`` and ``out_dir/decode.onnx`` and check parity.

    Args:
        model: a GPT module in eval mode (``forward(input_ids, *past)``).
        cfg: its :class:`~deepship.models.gpt.GPTConfig`.
        out_dir: destination folder (files written atomically).
        steps: decode steps of :func:`decode_parity` (0 skips it).
        prompt: int64 ``(batch, seq)`` prompt for :func:`decode_parity` (default: 2 held-out prompts of 16 tokens).
        atol, rtol: tolerance: fail if ``max_abs > atol + rtol * max|reference|``.

    Returns:
        :class:`KVExportResult`.

    Raises:
        ExportError: the export failed, a dynamic dim was fixed, or parity failed (naming the graph, the
            output and the step).
    """
    out_dir = Path(out_dir)
    model = model.eval()
    dspec, pspec = graph_spec(cfg, True), graph_spec(cfg, False)
    dec = export_onnx(flat_inputs(model, [t.name for t in dspec.inputs]), dspec, out_dir / DECODE_FILE, opset=opset,
                      atol=atol, rtol=rtol)
    pre = export_onnx(model, pspec, out_dir / PREFILL_FILE, opset=opset, atol=atol, rtol=rtol)
    files = share_weights([dec.path, pre.path], out_dir / WEIGHTS_FILE)
    res = KVExportResult(dec.path, pre.path, files, opset, parity={"decode": dec.parity, "prefill": pre.parity})
    if steps:
        if prompt is None:
            from ..models.gpt import heldout_prompts

            prompt = heldout_prompts(2, 16)
        res.parity["steps"] = decode_parity(model, cfg, pre.path, dec.path, prompt, steps=steps, atol=atol, rtol=rtol)
    return res


def share_weights(paths: list[Path], data_path: Path, min_bytes: int = 1024) -> list[Path]:
    """Move the initializers of several ONNX graphs into one external-data file they share.

    The prefill and decode graphs hold the same weights (under different names); stored once, the
    FP32 artifact is one copy of the weights plus two small graphs. Tensors of at least ``min_bytes``
    are stored once per distinct content (dtype, shape, bytes) in ``data_path`` (4 KB-aligned, as
    ONNX external data), and every graph points into it. Files are written to temporary names and
    renamed; the data file first, so no graph ever points at a missing file.

    Returns:
        the files: the graphs (in ``paths`` order) and ``data_path``.
    """
    import hashlib
    import os

    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    models = [onnx.load(str(p)) for p in paths]
    offsets: dict[str, tuple[int, int]] = {}
    tmp_data = data_path.with_name(f".tmp-{data_path.name}")
    with open(tmp_data, "wb") as f:
        for m in models:
            for init in m.graph.initializer:
                arr = numpy_helper.to_array(init)
                if arr.nbytes < min_bytes:
                    continue
                raw = arr.tobytes()
                key = hashlib.sha256(f"{init.data_type}{list(init.dims)}".encode() + raw).hexdigest()
                if key not in offsets:
                    pad = (-f.tell()) % 4096
                    f.write(b"\0" * pad)
                    offsets[key] = (f.tell(), len(raw))
                    f.write(raw)
                off, length = offsets[key]
                for field_name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    init.ClearField(field_name)
                init.raw_data = raw
                set_external_data(init, data_path.name, offset=off, length=length)
                init.data_location = onnx.TensorProto.EXTERNAL
                init.ClearField("raw_data")
    os.replace(tmp_data, data_path)
    for m, p in zip(models, paths):
        tmp = p.with_name(f".tmp-{p.name}")
        onnx.save_model(m, str(tmp))
        os.replace(tmp, p)
    return list(paths) + [data_path]


def decode_parity(model: Any, cfg: Any, prefill_path: str | Path, decode_path: str | Path, prompt: np.ndarray,
                  steps: int = PARITY_STEPS, atol: float = 1e-4, rtol: float = 1e-3) -> dict[str, Any]:
    """PyTorch against ONNX Runtime: the prefill of ``prompt``, then ``steps`` decode steps.

    Each runtime carries its own KV cache; both get the same next token (the PyTorch argmax), so the
    comparison covers error accumulated through the cache. Logits and every present tensor are
    compared at every step.

    Args:
        prompt: int64 ``(batch, seq)`` token ids; ``seq + steps`` must fit the context.

    Returns:
        ``{"prompt_shape", "steps", "max_abs_logits", "max_abs_cache", "max_rel", "same_argmax", "ok"}``
        (``same_argmax``: fraction of steps whose argmax agrees).

    Raises:
        ExportError: a step's logits or cache differ beyond ``atol + rtol * max|reference|``.
    """
    import torch

    from ..runtimes.session import OrtSession

    prompt = np.asarray(prompt, np.int64)
    pre, dec = OrtSession(prefill_path, threads=1), OrtSession(decode_path, threads=1)
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


def greedy_proposer(decode: Any, k: int) -> Any:
    """A greedy k-token proposal graph: the decode-step graph unrolled ``k`` times, with an ``ArgMax``
    of the last position's logits feeding the next copy (the draft side of speculative decoding in
    one ONNX Runtime call instead of ``k``).

    Inputs are the decode graph's (``input_ids`` int64 ``[batch, seq]``, ``past_key_values.{i}.key/value``
    ``[batch, heads, past, head_dim]``). Outputs: ``tokens`` int64 ``[batch, k]`` (``x_1..x_k``, each the
    argmax after the previous one) and ``present.{i}.key/value`` ``[batch, heads, past + seq + k - 1,
    head_dim]``: the cache after ``input_ids`` and ``x_1..x_{k-1}`` (``x_k`` is not fed), as ``k`` calls
    of the step graph would leave it. The copies share the initializers, so the weights are stored
    once; any decode graph with these names works (FP32, INT8 QDQ, INT4 MatMulNBits).

    Why: at a 1-layer draft's size (55 nodes, 0.1 ms a step) ONNX Runtime's per-call overhead and the
    Python around each call are a large part of a step; measured on the 2-core EPYC, 4 proposals take
    0.33 ms fused against 4 x 0.10 ms for the step graph alone, and speculative decoding ran
    1.06-1.16x faster end to end (docs/gpt.md).

    Args:
        decode: the decode-step ``onnx.ModelProto`` (external data may stay external: the result
            references the same initializers).
        k: proposals per call (>= 1).

    Returns:
        the new ``onnx.ModelProto`` (same opsets; ``value_info`` dropped).

    Raises:
        ExportError: ``k`` < 1, a graph without ``input_ids``/``logits``/matching past and present
            names, or a node with a subgraph (If/Loop/Scan: their outer-scope names are not renamed).
    """
    import copy

    import onnx
    from onnx import helper

    if int(k) != k or k < 1:
        raise ExportError(f"k {k} must be a positive integer (tokens proposed per call)")
    g = decode.graph
    inputs = [i.name for i in g.input]
    outputs = [o.name for o in g.output]
    past = [n for n in inputs if n.startswith("past_key_values.")]
    present = [f"present.{n[len('past_key_values.'):]}" for n in past]
    if "input_ids" not in inputs or "logits" not in outputs or not past or any(p not in outputs for p in present):
        raise ExportError("the decode graph needs input_ids + past_key_values.* inputs and logits + present.* "
                          "outputs; export it with deepship.exporters.kv")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise ExportError("the decode graph has a control-flow node (If/Loop/Scan); it cannot be unrolled here")
    nodes, tokens = [], []
    feed = {n: n for n in inputs}  # decode-graph input -> value that feeds this copy
    last = helper.make_tensor("proposer/last", onnx.TensorProto.INT64, [], [-1])
    for j in range(int(k)):
        names = dict(feed)
        for n in g.node:
            c = copy.deepcopy(n)
            c.name = f"step{j}/{n.name}"
            c.input[:] = [names.get(x, x) for x in n.input]  # initializers keep their (shared) names
            c.output[:] = [f"step{j}/{x}" if x else x for x in n.output]
            names.update((a, b) for a, b in zip(n.output, c.output) if a)
            nodes.append(c)
        row, tok = f"step{j}/proposer/last_logits", f"step{j}/proposer/token"
        nodes += [helper.make_node("Gather", [names["logits"], "proposer/last"], [row], axis=1, name=f"step{j}/proposer/gather"),
                  helper.make_node("ArgMax", [row], [tok], axis=-1, keepdims=1, name=f"step{j}/proposer/argmax")]
        tokens.append(tok)
        feed = {"input_ids": tok, **{p: names[q] for p, q in zip(past, present)}}
    nodes.append(helper.make_node("Concat", tokens, ["tokens"], axis=1, name="proposer/tokens"))
    nodes += [helper.make_node("Identity", [feed[p]], [q], name=f"proposer/{q}") for p, q in zip(past, present)]
    out_info = [helper.make_tensor_value_info("tokens", onnx.TensorProto.INT64, ["batch", int(k)])]
    out_info += [helper.make_tensor_value_info(q, next(o for o in g.output if o.name == q).type.tensor_type.elem_type,
                                               [None] * 4) for q in present]
    graph = helper.make_graph(nodes, f"{g.name}_greedy_k{k}", list(g.input), out_info,
                              initializer=list(g.initializer) + [last])
    graph.sparse_initializer.extend(g.sparse_initializer)
    m = helper.make_model(graph, opset_imports=list(decode.opset_import), ir_version=decode.ir_version)
    m.producer_name = "deepship.exporters.kv.greedy_proposer"
    return m


# ---- the pipeline stage -------------------------------------------------------------------------

def _register() -> None:
    from ..pipeline.stages import register_stage

    @register_stage("export", "onnx-kv", "torch", "onnx")
    def _export_kv_stage(ctx, parent, params, out: Path):
        """torch -> ONNX prefill + decode-step graphs with past_key_values/present, parity over 32 steps."""
        from ..models.gpt import variant_config

        module = ctx.torch_session(parent).module
        cfg = variant_config(ctx, parent)  # a pruned parent has fewer heads / a narrower MLP
        res = export_kv(module, cfg, out, opset=int(params.get("opset", DEFAULT_OPSET)),
                        steps=int(params.get("steps", PARITY_STEPS)))
        files = [f.name for f in res.files]  # decode.onnx first: the main file, which quantization reads
        parity = {k: ({**v, "shape": _compact(v["shape"])} if isinstance(v, dict) and "shape" in v else v)
                  for k, v in res.parity["decode"].items()}
        return files, {"opset": res.opset, "parity": parity, "parity_prefill": res.parity["prefill"],
                       "parity_steps": res.parity.get("steps"), "graphs": {"decode": DECODE_FILE, "prefill": PREFILL_FILE},
                       "exporter": "torch.onnx.export(dynamo=True)"}


def _compact(shapes: dict) -> dict:
    """``{input: shape}`` with the ``2 * n_layer`` past inputs folded into one ``past_key_values.*`` entry."""
    out = {k: v for k, v in shapes.items() if not k.startswith("past_key_values.")}
    past = [v for k, v in shapes.items() if k.startswith("past_key_values.")]
    if past:
        out["past_key_values.*"] = past[0]
    return out


_register()
