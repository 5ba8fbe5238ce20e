"""The GPT decoder as one ONNX graph with fused attention (ONNX Runtime's ``GroupQueryAttention``) and
a fixed-size KV cache that the graph updates in place.

Why a second decoder graph: the plain graphs of :mod:`deepship.exporters.kv` concatenate past and new
keys/values (one copy of the whole cache per layer per step) and give every row of a batch the same
past length, so rows that joined at different times cannot share a decode step. ONNX Runtime's
``com.microsoft.GroupQueryAttention`` contrib op (used here with ``kv_num_heads == num_heads``, i.e.
plain multi-head attention) takes per-row cache lengths (``seqlens_k``), applies the causal mask
itself, and when its ``present`` outputs are bound to the same buffers as its ``past`` inputs
(IOBinding) writes the new keys/values into them in place. That is what continuous batching over a
bounded pool of cache slots needs (:mod:`deepship.runtimes.kvpool`).

The graph is written node by node from the module's weights with ``onnx.helper``, the way ONNX
Runtime GenAI's model builder (``onnxruntime_genai.models.builder``) writes its decoders, since
``torch.onnx.export`` has no translation of a PyTorch attention to the contrib op.

| name | dtype | shape | meaning |
|---|---|---|---|
| ``input_ids`` (in) | int64 | ``[batch, seq]`` | new tokens |
| ``position_ids`` (in) | int64 | ``[batch, seq]`` | their absolute positions (row ``i``: ``len_i .. len_i + seq - 1``) |
| ``seqlens_k`` (in) | int32 | ``[batch]`` | per row, cached tokens after this call minus 1 (``len_i + seq - 1``) |
| ``total_sequence_length`` (in) | int32 | scalar | ``max_i(len_i + seq)`` |
| ``past_key_values.{i}.key/value`` (in) | float32 | ``[batch, n_head, context, head_dim]`` | the cache buffers |
| ``logits`` (out) | float32 | ``[batch, seq, vocab]`` | next-token logits |
| ``present.{i}.key/value`` (out) | float32 | ``[batch, n_head, context, head_dim]`` | the same buffers, updated |

The CPU kernel handles a batch of one-token steps at different lengths, one row with several new
tokens after a cache (a prefill chunk, a speculative verification pass) and a batch of equal prompts
on empty caches; it refuses several rows with several new tokens after a cache ("batch_size must be 1
when sequence_length > 1 and past context is given", ONNX Runtime 1.32), which the runtimes then feed
row by row (:mod:`deepship.runtimes.kvpool`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from .onnx import save_onnx

FUSED_FILE = "decode.onnx"
#: ``com.microsoft`` opset of the contrib ops
MS_OPSET = 1
FUSED_OPSET = 17


def fused_input_names(n_layer: int) -> list[str]:
    """Input names of the fused graph, in order."""
    return ["input_ids", "position_ids", "seqlens_k", "total_sequence_length"] + [
        f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def export_fused(model: Any, cfg: Any, path: str | Path) -> Path:
    """Write the fused-attention decoder graph of a GPT module to ``path`` (atomically).

    Args:
        model: a :class:`deepship.models.gpt.GPT` (its weights are read; fused or unfused q/k/v).
        cfg: its :class:`~deepship.models.gpt.GPTConfig` (``n_layer``, ``n_head``, ``head_dim``,
            ``vocab_size``, ``context``).
        path: the ``.onnx`` file to write; weights are stored inline (the model is a few MB).

    Returns:
        ``path``.

    Raises:
        ExportError: the module does not have the GPT layout (a weight is missing or mis-shaped).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    H, D, L = cfg.n_head, cfg.head_dim, cfg.n_layer
    C = H * D
    inits: list = []
    nodes: list = []

    def w(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), name))
        return name

    def get(key: str) -> np.ndarray:
        if key not in sd:
            raise ExportError(f"the module has no weight '{key}'; export_fused takes a deepship GPT")
        return sd[key]

    def node(op: str, ins: list[str], outs: list[str], domain: str = "", **attrs) -> str:
        nodes.append(helper.make_node(op, ins, outs, name=outs[0], domain=domain, **attrs))
        return outs[0]

    def linear(x: str, prefix: str, out: str) -> str:
        wt = w(f"{prefix}.weight_t", get(f"{prefix}.weight").T)
        y = node("MatMul", [x, wt], [out + "_mm"])
        return node("Add", [y, w(f"{prefix}.bias", get(f"{prefix}.bias"))], [out])

    def layernorm(x: str, prefix: str, out: str) -> str:
        return node("LayerNormalization", [x, w(f"{prefix}.weight", get(f"{prefix}.weight")),
                                           w(f"{prefix}.bias", get(f"{prefix}.bias"))], [out], axis=-1, epsilon=1e-5)

    tok = w("tok_emb.weight", get("tok_emb.weight"))
    if get("tok_emb.weight").shape != (cfg.vocab_size, cfg.d_model):
        raise ExportError(f"tok_emb.weight has shape {get('tok_emb.weight').shape}, the config says "
                          f"({cfg.vocab_size}, {cfg.d_model}); pass the module's own config")
    te = node("Gather", [tok, "input_ids"], ["tok"], axis=0)
    pe = node("Gather", [w("pos_emb.weight", get("pos_emb.weight")), "position_ids"], ["pos"], axis=0)
    x = node("Add", [te, pe], ["x0"])
    for i in range(L):
        p = f"blocks.{i}"
        h = layernorm(x, f"{p}.ln1", f"h{i}")
        if f"{p}.attn.qkv.weight" not in sd:  # unfused during pruning: fuse here
            for part in ("weight", "bias"):
                sd[f"{p}.attn.qkv.{part}"] = np.concatenate([get(f"{p}.attn.{n}.{part}") for n in "qkv"])
        if get(f"{p}.attn.qkv.weight").shape[0] != 3 * C:
            raise ExportError(f"{p}.attn.qkv has {get(f'{p}.attn.qkv.weight').shape[0]} outputs, not 3 x {C}; "
                              "pass the module's own config (n_head, head_size)")
        qkv = linear(h, f"{p}.attn.qkv", f"qkv{i}")
        q, k, v = f"q{i}", f"k{i}", f"v{i}"
        if i == 0:
            inits.append(numpy_helper.from_array(np.array([C, C, C], np.int64), "qkv_split"))
        nodes.append(helper.make_node("Split", [qkv, "qkv_split"], [q, k, v], name=f"split{i}", axis=2))
        att = node("GroupQueryAttention", [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                           "seqlens_k", "total_sequence_length"],
                   [f"att{i}", f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
                   num_heads=H, kv_num_heads=H, scale=1.0 / math.sqrt(D))
        x = node("Add", [x, linear(att, f"{p}.attn.proj", f"proj{i}")], [f"xa{i}"])
        h2 = layernorm(x, f"{p}.ln2", f"h2_{i}")
        g = node("Gelu", [linear(h2, f"{p}.fc", f"fc{i}")], [f"gelu{i}"], domain="com.microsoft")
        x = node("Add", [x, linear(g, f"{p}.out", f"out{i}")], [f"x{i + 1}"])
    hf = layernorm(x, "ln_f", "hf")
    node("MatMul", [hf, w("lm_head.weight_t", get("tok_emb.weight").T)], ["logits"])

    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    cache = ["batch", H, cfg.context, D]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", i32, [])]
    inputs += [helper.make_tensor_value_info(n, f32, cache) for n in fused_input_names(L)[4:]]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", cfg.vocab_size])]
    outputs += [helper.make_tensor_value_info(f"present.{i}.{kv}", f32, cache) for i in range(L) for kv in ("key", "value")]
    graph = helper.make_graph(nodes, "gpt_fused_attention", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", FUSED_OPSET),
                                                helper.make_opsetid("com.microsoft", MS_OPSET)],
                          producer_name="deepship.exporters.fused")
    m.ir_version = 8
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the fused graph is invalid: {str(e).splitlines()[0]}") from None
    save_onnx(m, path)
    return path


# ---- unmerged LoRA adapters, several at once, chosen per row ------------------------------------------

#: input of a graph with adapters: int64 ``[batch]``, the adapter of each row (0: none, the base model)
ADAPTER_INPUT = "adapter_ids"


def read_peft_adapter(folder: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The LoRA weights of an adapter saved in PEFT's format (``adapter_config.json`` +
    ``adapter_model.safetensors``, as ``optimize finetune`` writes them), read with NumPy only.

    Returns:
        ``{module path (e.g. "blocks.0.attn.qkv"): (A float32 (r, in), B float32 (out, r) * lora_alpha / r)}``
        (the scale folded into ``B``; rsLoRA's ``alpha / sqrt(r)`` when the config says so).

    Raises:
        ExportError: no adapter there, not a LoRA adapter, or DoRA/bias/modules_to_save, which a
            low-rank branch cannot express.
    """
    import json

    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise ExportError(f"{folder} holds no PEFT adapter (adapter_config.json + adapter_model.safetensors); "
                          "give a folder written by optimize finetune")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("bias", "none") != "none" \
            or cfg.get("modules_to_save"):
        raise ExportError(f"{folder}: only plain LoRA adapters are served unmerged (no DoRA, bias or modules_to_save); "
                          "merge this one (optimize finetune --merge) and serve the merged model")
    weights = load_file(str(w_path))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        alpha = float(cfg.get("alpha_pattern", {}).get(path.rsplit(".", 1)[-1], cfg["lora_alpha"]))
        r_cfg = int(cfg.get("rank_pattern", {}).get(path.rsplit(".", 1)[-1], r))
        scale = alpha / (math.sqrt(r_cfg) if cfg.get("use_rslora") else r_cfg)
        out[path] = (a.astype(np.float32), (b * scale).astype(np.float32))
    if not out:
        raise ExportError(f"{folder}: adapter_model.safetensors has no lora_A/lora_B weights")
    return out


def add_lora(model: Any, adapters: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> Any:
    """A copy of a fused decoder graph (:func:`export_fused`) with unmerged LoRA branches (Hu et al.
    2021) for several adapters at once, chosen per row by the input :data:`ADAPTER_INPUT`.

    Every linear that some adapter adapts gets ``y = x W + b + x A_g^T B_g^T``, with ``A_g``, ``B_g``
    the row's adapter gathered from stacks ``[n + 1, in, r]`` and ``[n + 1, r, out]`` (index 0 is all
    zeros: the base model; an adapter that leaves a linear alone is zeros there; ranks are padded with
    zeros to the largest): the batched gather-matmul of the multi-LoRA servers (Punica's BGMV, Chen et
    al. 2023; S-LoRA, Sheng et al. 2023), in standard ONNX ops.

    Args:
        model: the fused graph's ``onnx.ModelProto`` (not changed).
        adapters: per adapter, :func:`read_peft_adapter`'s dict; adapter ``i`` gets index ``i + 1``.

    Returns:
        the new ``onnx.ModelProto`` (weights inline).

    Raises:
        ExportError: an adapter names a linear the graph does not have, or its shapes do not fit.
    """
    import copy

    from onnx import TensorProto, helper, numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    by_weight = {n.input[1]: n for n in g.node if n.op_type == "MatMul" and len(n.input) == 2}
    shapes = {i.name: tuple(i.dims) for i in g.initializer}
    paths = sorted({p for a in adapters for p in a})
    nodes = list(g.node)
    for path in paths:
        w_name = f"{path}.weight_t"
        mm = by_weight.get(w_name)
        if mm is None:
            raise ExportError(f"an adapter adapts '{path}', which the decoder graph has no linear for; "
                              "serve it with the model it was trained on")
        d_in, d_out = shapes[w_name]
        rank = max(a[path][0].shape[0] for a in adapters if path in a)
        at = np.zeros((len(adapters) + 1, d_in, rank), np.float32)
        bt = np.zeros((len(adapters) + 1, rank, d_out), np.float32)
        for i, a in enumerate(adapters, start=1):
            if path in a:
                A, B = a[path]
                if A.shape[1] != d_in or B.shape[0] != d_out:
                    raise ExportError(f"adapter {i}: '{path}' has A {A.shape} and B {B.shape}, the graph's linear is "
                                      f"{d_in} -> {d_out}; serve it with the model it was trained on")
                at[i, :, : A.shape[0]] = A.T
                bt[i, : A.shape[0]] = B.T
        g.initializer.extend([numpy_helper.from_array(at, f"{path}.lora_At"), numpy_helper.from_array(bt, f"{path}.lora_Bt")])
        x, y = mm.input[0], mm.output[0]
        new = [helper.make_node("Gather", [f"{path}.lora_At", ADAPTER_INPUT], [f"{path}.lora_a"], name=f"{path}.lora_a", axis=0),
               helper.make_node("Gather", [f"{path}.lora_Bt", ADAPTER_INPUT], [f"{path}.lora_b"], name=f"{path}.lora_b", axis=0),
               helper.make_node("MatMul", [x, f"{path}.lora_a"], [f"{path}.lora_xa"], name=f"{path}.lora_xa"),
               helper.make_node("MatMul", [f"{path}.lora_xa", f"{path}.lora_b"], [f"{path}.lora_y"], name=f"{path}.lora_y"),
               helper.make_node("Add", [y, f"{path}.lora_y"], [f"{y}_lora"], name=f"{y}_lora")]
        for n in nodes:  # the consumers of the base product now read base + LoRA
            for j, inp in enumerate(n.input):
                if inp == y:
                    n.input[j] = f"{y}_lora"
        nodes[nodes.index(mm) + 1: nodes.index(mm) + 1] = new
    del g.node[:]
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info(ADAPTER_INPUT, TensorProto.INT64, ["batch"]))
    return m
