"""The GPT decoder module and its config (torch only); see :mod:`deepship.models.gpt` for the zoo
entries, sources and how the committed weights are reproduced."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import InputSpecError
from ..spec import ArchConfig, TensorSpec
from ..train import fp16_storage

# ---- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPTConfig(ArchConfig):
    """Size of a GPT decoder; the target and the draft are two instances of it.

    Attributes:
        vocab_size: tokens in the vocabulary (the tokenizer's size).
        context: maximum sequence length in tokens (prompt + generated), = position-embedding rows.
        n_layer: transformer blocks.
        n_head: attention heads; ``d_model`` must be a multiple of it.
        d_model: residual width.
        mlp_ratio: MLP hidden width = ``mlp_ratio * d_model`` (unless ``d_mlp`` is set).
        dropout: dropout during training (0 at inference).
        head_size: width of one attention head; 0 means ``d_model // n_head``. Set by head pruning,
            which removes whole heads: the attention width ``n_head * head_size`` then falls below
            ``d_model`` while the residual width stays.
        d_mlp: MLP hidden width; 0 means ``mlp_ratio * d_model``. Set by MLP-width pruning.

    ``head_size`` and ``d_mlp`` are left out of :meth:`to_dict` while 0, so the recipes (and the
    recipe hashes of the committed weights) of full-size models do not depend on them.
    """

    vocab_size: int = 1024
    context: int = 384
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    head_size: int = 0
    d_mlp: int = 0

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated heads: ``n_head * head_dim`` (``d_model`` unless heads were pruned)."""
        return self.n_head * self.head_dim

    @property
    def mlp_dim(self) -> int:
        return self.d_mlp or self.mlp_ratio * self.d_model

    def to_dict(self) -> dict:
        d = super().to_dict()
        for k in ("head_size", "d_mlp"):
            if not d[k]:
                del d[k]
        return d

TARGET = GPTConfig()
DRAFT = GPTConfig(n_layer=1, n_head=4, d_model=128)


# ---- the module ---------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an explicit KV cache.

    The query, key and value projections are one fused ``qkv`` Linear ``d_model -> 3 * attn_dim``
    (``attn_dim = n_head * head_dim``, laid out ``[q | k | v]``), and ``proj`` maps ``attn_dim -> d_model``.

    ``forward(x, past_k, past_v)``: ``x`` float32 ``(batch, seq, d_model)``; ``past_k``/``past_v``
    float32 ``(batch, n_head, past, head_dim)`` or ``None``. Returns ``(y, present_k, present_v)`` with
    ``y`` ``(batch, seq, d_model)`` and the presents ``(batch, n_head, past + seq, head_dim)``. Query
    ``i`` (absolute position ``past + i``) attends to keys ``0..past + i``.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if not cfg.head_size and cfg.d_model % cfg.n_head:
            raise InputSpecError(f"d_model {cfg.d_model} is not a multiple of n_head {cfg.n_head}; change one")
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.attn_dim)
        self.proj = nn.Linear(cfg.attn_dim, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, past_k=None, past_v=None):
        b, s, _ = x.shape
        c = self.n_head * self.head_dim
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).split(c, dim=2)
        else:  # unfused for head pruning (see unfuse_qkv)
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_head, self.head_dim).transpose(1, 2)
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        t = k.shape[2]
        if torch.compiler.is_exporting():
            # explicit ops for the ONNX graph (fewer nodes than the exporter's SDPA decomposition);
            # the causal mask with the past offset is built from shapes so past/seq stay dynamic
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            allowed = torch.arange(t, device=x.device)[None, :] <= (torch.arange(s, device=x.device) + (t - s))[:, None]
            att = torch.softmax(att.masked_fill(~allowed, float("-inf")), dim=-1)
            y = att @ v
        elif past_k is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.drop.p if self.training else 0.0)
        else:
            allowed = torch.arange(t, device=x.device)[None, :] <= (torch.arange(s, device=x.device) + (t - s))[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.drop.p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, s, c)
        return self.drop(self.proj(y)), k, v


    def unfuse_qkv(self) -> None:
        """Replace the fused ``qkv`` Linear by three Linears ``q``, ``k``, ``v`` (same weights, same
        outputs). torch-pruning's dependency graph couples channel ``i`` of ``q``, ``k``, ``v`` and
        ``proj``'s input only in this form (through a fused ``qkv`` its index mapping is wrong)."""
        w, bias = self.qkv.weight.detach(), self.qkv.bias.detach()
        c = w.shape[0] // 3
        for j, name in enumerate("qkv"):
            lin = nn.Linear(w.shape[1], c)
            with torch.no_grad():
                lin.weight.copy_(w[j * c:(j + 1) * c])
                lin.bias.copy_(bias[j * c:(j + 1) * c])
            setattr(self, name, lin)
        del self.qkv

    def fuse_qkv(self) -> None:
        """Undo :meth:`unfuse_qkv` (after pruning): one ``qkv`` Linear again, ``n_head`` read from its width."""
        q, k, v = self.q, self.k, self.v
        self.qkv = nn.Linear(q.in_features, 3 * q.out_features)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        del self.q, self.k, self.v
        self.n_head = q.out_features // self.head_dim


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_dim)
        self.out = nn.Linear(cfg.mlp_dim, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, past_k=None, past_v=None):
        a, k, v = self.attn(self.ln1(x), past_k, past_v)
        x = x + a
        x = x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))
        return x, k, v


class GPT(nn.Module):
    """GPT decoder with an explicit KV cache.

    ``forward(input_ids, *past)``:

    - ``input_ids``: int64 ``(batch, seq)``, token ids in ``[0, vocab_size)``;
    - ``past``: empty (prefill), or ``2 * n_layer`` float32 tensors ``(batch, n_head, past, head_dim)``
      ordered ``key_0, value_0, key_1, value_1, ...`` (the ONNX inputs ``past_key_values.{i}.key/value``).

    Returns ``(logits, *present)``: logits float32 ``(batch, seq, vocab_size)`` for the next token at
    each position, and ``2 * n_layer`` presents ``(batch, n_head, past + seq, head_dim)``
    (``present.{i}.key/value``). ``past + seq`` must not exceed ``context``.

    ``state_dict()`` holds float16 tensors (the storage precision); ``load_state_dict`` casts back.
    """

    def __init__(self, cfg: GPTConfig = TARGET):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("attn.proj.weight", "out.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
        self.register_state_dict_post_hook(fp16_storage)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, *past):
        b, s = input_ids.shape
        if past and not torch.compiler.is_exporting() and past[0].shape[2] == 0:
            past = ()  # an empty cache, whatever its head layout (a pruned model has fewer heads)
        p = past[0].shape[2] if past else 0
        pos = torch.arange(s, device=input_ids.device) + p
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        present = []
        for i, blk in enumerate(self.blocks):
            x, k, v = blk(x, *(past[2 * i:2 * i + 2] if past else (None, None)))
            present += [k, v]
        logits = F.linear(self.ln_f(x), self.tok_emb.weight)
        return (logits, *present)


def input_names(cfg: GPTConfig) -> list[str]:
    """ONNX input names of the decode-step graph: ``input_ids`` then ``past_key_values.{i}.key/value``."""
    return ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(cfg.n_layer) for kv in ("key", "value")]


def output_names(cfg: GPTConfig) -> list[str]:
    """ONNX output names: ``logits`` then ``present.{i}.key/value``."""
    return ["logits"] + [f"present.{i}.{kv}" for i in range(cfg.n_layer) for kv in ("key", "value")]


def input_specs(cfg: GPTConfig, past: bool = True) -> list[TensorSpec]:
    """Input specs (named dynamic dims ``batch``, ``seq``, ``past``) of the decode-step graph (``past``)
    or of the prefill graph (``input_ids`` only)."""
    specs = [TensorSpec("input_ids", ("batch", "seq"), "int64", 0, cfg.vocab_size)]
    if past:
        specs += [TensorSpec(n, ("batch", cfg.n_head, "past", cfg.head_dim), "float32", -1.0, 1.0)
                  for n in input_names(cfg)[1:]]
    return specs


def empty_past(cfg: GPTConfig, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past arrays float32 ``(batch, n_head, 0, head_dim)`` for every past input."""
    return {n: np.zeros((batch, cfg.n_head, 0, cfg.head_dim), np.float32) for n in input_names(cfg)[1:]}


@torch.no_grad()
def continue_tokens(model: GPT, prompts: np.ndarray, new_tokens: int, temperature: float | None = None,
                    seed: int = 0) -> np.ndarray:
    """Continue int64 ``(batch, seq)`` prompts by ``new_tokens`` tokens with the KV cache, in torch:
    greedy (``temperature=None``), else sampled from ``softmax(logits / temperature)`` (NumPy generator
    seeded by ``seed``). The last token is not fed back, so the cache never holds more than
    ``seq + new_tokens - 1 <= context`` tokens.

    Returns:
        int64 ``(batch, new_tokens)``.
    """
    rng = np.random.default_rng(seed)
    out = model(torch.from_numpy(np.ascontiguousarray(prompts, dtype=np.int64)))
    logits, past = out[0][:, -1], list(out[1:])
    toks = []
    for step in range(new_tokens):
        if temperature is None:
            tok = logits.argmax(-1).numpy()
        else:
            z = logits.double().numpy() / temperature
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            tok = np.array([rng.choice(len(row), p=row) for row in p], np.int64)
        toks.append(tok)
        if step < new_tokens - 1:
            out = model(torch.from_numpy(tok[:, None]), *past)
            logits, past = out[0][:, -1], list(out[1:])
    return np.stack(toks, 1).astype(np.int64)
