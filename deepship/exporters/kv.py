"""Decoder export with an explicit KV cache: a prefill graph and a decode-step graph.

Both graphs come from one module (:class:`deepship.models.gpt.GPT`, ``forward(input_ids, *past)``)
through :func:`deepship.exporters.onnx.export_onnx` (dynamo exporter, named dynamic dims checked),
with the input/output names Optimum and ONNX Runtime GenAI use:

| graph | inputs | outputs |
|---|---|---|
| ``prefill.onnx`` | ``input_ids`` int64 ``[batch, seq]`` | ``logits`` float32 ``[batch, seq, vocab]``, ``present.{i}.key/value`` float32 ``[batch, heads, seq, head_dim]`` |
| ``decode.onnx`` | ``input_ids`` int64 ``[batch, seq]``, ``past_key_values.{i}.key/value`` float32 ``[batch, heads, past, head_dim]`` | ``logits`` ``[batch, seq, vocab]``, ``present.{i}.key/value`` ``[batch, heads, past + seq, head_dim]`` |

``batch``, ``seq`` and ``past`` are dynamic; the decode graph also accepts ``past = 0`` (an empty
cache) and ``seq > 1`` (the verification pass of speculative decoding). The pipeline's ``onnx-kv``
export stage (:mod:`deepship.pipeline.arch.gpt`) checks each graph at two shapes and runs PyTorch and
ONNX Runtime side by side over 32 decode steps (:func:`deepship.pipeline.parity.decode_parity`).

The folder holds ``decode.onnx`` (the main file, which quantization stages consume), ``prefill.onnx``
and ``weights.bin``: the weights, stored once as external data that both graphs point into
(:func:`share_weights`), so the FP32 artifact is not twice the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models.gpt import input_specs, output_names
from ..models.spec import ModelSpec
from .onnx import DEFAULT_OPSET, export_onnx

DECODE_FILE = "decode.onnx"
PREFILL_FILE = "prefill.onnx"
WEIGHTS_FILE = "weights.bin"  # external data shared by both graphs


@dataclass
class KVExportResult:
    """Result of :func:`export_kv`.

    Attributes:
        decode, prefill: the two ``.onnx`` files.
        files: every file written (external data included).
        opset: default-domain opset.
    """

    decode: Path
    prefill: Path
    files: list[Path]
    opset: int


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
    return ModelSpec(name=name, task="language-modeling", build=None, inputs=input_specs(cfg, past=past),
                     output_names=output_names(cfg))


def export_kv(model: Any, cfg: Any, out_dir: str | Path, opset: int = DEFAULT_OPSET) -> KVExportResult:
    """Export ``model`` as ``out_dir/prefill.onnx`` and ``out_dir/decode.onnx`` sharing ``weights.bin``.

    Args:
        model: a GPT module in eval mode (``forward(input_ids, *past)``).
        cfg: its :class:`~deepship.models.gpt.GPTConfig`.
        out_dir: destination folder (files written atomically).

    Returns:
        :class:`KVExportResult`.

    Raises:
        ExportError: the export failed, or a dynamic dim was fixed (naming the graph's input).
    """
    out_dir = Path(out_dir)
    model = model.eval()
    dspec, pspec = graph_spec(cfg, True), graph_spec(cfg, False)
    dec = export_onnx(flat_inputs(model, [t.name for t in dspec.inputs]), dspec, out_dir / DECODE_FILE, opset=opset)
    pre = export_onnx(model, pspec, out_dir / PREFILL_FILE, opset=opset)
    files = share_weights([dec.path, pre.path], out_dir / WEIGHTS_FILE)
    return KVExportResult(dec.path, pre.path, files, opset)


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
