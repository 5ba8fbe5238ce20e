"""A selective state-space language model (Mamba, in its Mamba-2 "SSD" form) on tiny-shakespeare.

| zoo name | architecture | parameters | data | metric |
|---|---|---|---|---|
| ``mamba`` | 12 residual Mamba-2 blocks, d_model 128, expand 2 (d_inner 256), 4 heads of 64, d_state 16, conv kernel 4, tied LM head | 1.39M (1,388,176) | tiny-shakespeare, the GPT's byte-level BPE (1,024) | held-out perplexity (lower is better), bigram reference |

**Sources.** Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
(arXiv:2312.00752): the selective SSM (input-dependent step size Δ and projections B, C), the block
layout (in_proj to x and a gate z, causal depthwise conv1d, SiLU, SSM, gating by SiLU(z), out_proj),
residual blocks with RMSNorm, tied embeddings. Dao & Gu 2024, "Transformers are SSMs: Generalized
Models and Efficient Algorithms Through Structured State Space Duality" (arXiv:2405.21060): the
Mamba-2 restriction of A to a scalar per head, B and C shared by all heads (one group), the conv over
x, B and C together, the gated RMSNorm before out_proj, and the *SSD* (state space dual) quadratic
form used here for whole sequences.

**The two equivalent forms.** Per head ``h`` with scalar ``A_h < 0``, state ``H_t`` (``head_dim x
d_state``), input ``x_t`` (``head_dim``), ``B_t, C_t`` (``d_state``) and step size ``Δ_t > 0``:

- *recurrent* (the step graph, streaming): ``H_t = exp(Δ_t A_h) H_{t-1} + Δ_t x_t B_tᵀ``,
  ``y_t = H_t C_t + D_h x_t``;
- *parallel* (the zoo graph, training, prefill): ``y = (L ∘ C Bᵀ) (Δ x) + D x`` with the causal
  decay matrix ``L_ts = exp(Σ_{k=s+1..t} Δ_k A_h)`` for ``s <= t`` and 0 above the diagonal (the
  "segsum" of Dao & Gu 2024, section 6 / their ``ssd_minimal`` reference). Both are exact, so the step
  graph reproduces the whole-sequence logits to float32 rounding.

The parallel form is plain matmuls, exp, cumsum and masks over the sequence dimension: no Python
loop over time, so ``torch.onnx.export(dynamo=True)`` keeps ``seq`` dynamic (see the field notes). The
exported graph uses the single-chunk quadratic form :func:`ssd` (work ``L²`` per head, like
attention). Eager PyTorch (training, the 384-token evaluation windows) uses the chunked SSD algorithm
:func:`ssd_chunked` (chunks of 32 tokens, work ``L x 32``; 2-3x faster here) when the length is a
multiple of the chunk; both compute the same map. The chunked form is not exported: a padded variant
exported without error but the exporter froze the *number of chunks* of the example (ONNX Runtime
then failed at other lengths), so the whole-sequence graph stays quadratic.

**Numerics of the segment sums.** ``segsum[t, s] = Σ_{k=s+1..t} a_k`` (``a = Δ A <= 0``) is computed
as a cumulative sum over ``t`` of the masked matrix ``a_k [k > s]`` (each entry sums only its own
segment), not as the difference ``cumsum_t - cumsum_s`` of two long running sums: over a 384-token
window the running sums reach thousands, and their difference would lose about 3 decimal digits on
the near-diagonal entries that matter most. Entries above the diagonal are set to ``-inf`` with
``masked_fill`` *before* ``exp`` (``exp(-inf) = 0``; no overflow, no NaN gradients).

**Data, tokenizer, metric, training.** Reused from :mod:`deepship.models.gpt`: the same text split,
tokenizer, held-out perplexity over all held-out tokens in non-overlapping 384-token windows (so the
number is directly comparable with the GPT's), the bigram reference, and the same seeded training loop
(:func:`deepship.models.gpt.train_gpt`: AdamW, warm-up + cosine, random 384-token windows from the
training split only). Recipe: 700 steps of 2 x 384 tokens (537,600 tokens, a third of the GPT's),
lr 5e-3, 1 thread (faster than 2 on the shared 2-core machine); 578 s measured at load average ~10. Weights are stored as float16 (rounded at the end of training) and computed in
float32.

Graphs:

1. the zoo graph ``input_ids:int64[batch,seq] -> logits:float32[batch,seq,vocab]`` (dynamic batch
   and seq), exported and parity-checked by the pipeline (``optimize export mamba``);
2. the *step graph* for streaming generation (:func:`export_step_graph`): ``input_ids`` int64
   ``(batch, 1)`` and, per layer ``i``, ``conv_state.{i}`` float32 ``(batch, conv_channels, d_conv - 1)``
   (the last inputs of the causal conv) and ``ssm_state.{i}`` float32 ``(batch, n_heads, head_dim,
   d_state)`` (the SSM state ``H``) -> ``logits`` ``(batch, 1, vocab)``, ``next_conv_state.{i}``,
   ``next_ssm_state.{i}``. Constant memory per token, whatever the length of the stream.

Reproduce the committed weights (``deepship/models/weights/mamba.safetensors``)::

    DEEPSHIP_TRAIN_LOG=1 optimize train mamba --out deepship/models/weights
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ExportError, InputSpecError
from . import gpt
from .spec import ArchConfig, Dataset, ModelSpec, Split, TensorSpec
from .train import fp16_storage, train_log

# ---- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MambaConfig(ArchConfig):
    """Size of a Mamba-2 language model.

    Attributes:
        vocab_size: tokens in the vocabulary (the GPT tokenizer's 1,024).
        n_layer: residual Mamba blocks.
        d_model: residual width.
        expand: ``d_inner = expand * d_model`` (width of x, z and y inside a block).
        head_dim: channels per SSM head; ``d_inner`` must be a multiple of it.
        d_state: SSM state size N per head (length of B and C).
        d_conv: kernel of the causal depthwise conv1d over time.
        context: evaluation / training window in tokens. Not a limit of the model (no position
            embeddings): the step graph streams any number of tokens.
        dt_min, dt_max: range of the initial step sizes Δ (log-uniform, as in Gu & Dao 2023).
        chunk: SSD chunk length for training (:func:`ssd_chunked`); inference and export use the
            single-chunk quadratic form :func:`ssd` (same values). 0 disables chunking.
    """

    vocab_size: int = 1024
    n_layer: int = 12
    d_model: int = 128
    expand: int = 2
    head_dim: int = 64
    d_state: int = 16
    d_conv: int = 4
    context: int = 384
    dt_min: float = 0.001
    dt_max: float = 0.1
    chunk: int = 32

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_channels(self) -> int:
        """Channels of the causal conv (x, B and C are convolved together, as in Mamba-2)."""
        return self.d_inner + 2 * self.d_state


TARGET = MambaConfig()


# ---- the SSD kernel -------------------------------------------------------------------------------

def _lower(n: int, device, strict: bool) -> torch.Tensor:
    """Boolean ``(n, n)`` mask, True where row ``t`` >= column ``s`` (``> s`` when ``strict``); built from
    ``arange`` so ``n`` stays a symbolic size under export."""
    i = torch.arange(n, device=device)
    return (i[:, None] > i[None, :]) if strict else (i[:, None] >= i[None, :])


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums ``out[..., t, s] = Σ_{k=s+1..t} a[..., k]`` for ``s <= t``, ``-inf`` for ``s > t``.

    Computed as a cumsum over ``t`` of ``a_k [k > s]`` (each entry sums only its own segment; see
    the module docstring for why not a difference of running sums).

    Args:
        a: float ``(..., L)``, here ``Δ A`` (log decay per step, <= 0).

    Returns:
        float ``(..., L, L)``; ``exp(segsum(a))`` is the causal decay matrix ``L`` of SSD.
    """
    n = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, n)  # [..., k, s] = a_k
    rep = rep.masked_fill(~_lower(n, a.device, strict=True), 0.0)
    out = torch.cumsum(rep, dim=-2)
    return out.masked_fill(~_lower(n, a.device, strict=False), float("-inf"))


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        return_state: bool = False):
    """The selective SSM over a whole sequence, SSD quadratic form (Dao & Gu 2024), without the ``D`` skip.

    ``y_t = Σ_{s<=t} exp(Σ_{k=s+1..t} Δ_k A) (C_t · B_s) Δ_s x_s``, which equals the recurrence
    ``H_t = exp(Δ_t A) H_{t-1} + Δ_t x_t B_tᵀ``, ``y_t = H_t C_t`` from ``H_{-1} = 0``.

    Args:
        x: float32 ``(batch, L, heads, head_dim)``.
        dt: float32 ``(batch, L, heads)``, step sizes Δ > 0.
        A: float32 ``(heads,)``, negative (continuous-time decay rate per head).
        B, C: float32 ``(batch, L, d_state)`` (one group shared by the heads).
        return_state: also return the final state ``H_{L-1}``.

    Returns:
        ``y`` float32 ``(batch, L, heads, head_dim)``; with ``return_state`` also the state float32
        ``(batch, heads, head_dim, d_state)``.
    """
    a = (dt * A).transpose(1, 2)                       # (b, H, L) log decay per step
    decay = torch.exp(segsum(a))                        # (b, H, L, L), zero above the diagonal
    scores = torch.matmul(C, B.transpose(1, 2))         # (b, L, L): C_t . B_s
    xdt = (x * dt.unsqueeze(-1)).transpose(1, 2)        # (b, H, L, P)
    y = torch.matmul(decay * scores.unsqueeze(1), xdt)  # (b, H, L, P)
    y = y.transpose(1, 2)
    if not return_state:
        return y
    last = decay[:, :, -1, :]                            # (b, H, L): decay from s to the end
    state = torch.einsum("bhs,bhsp,bsn->bhpn", last, xdt, B)
    return y, state


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk: int) -> torch.Tensor:
    """The same map as :func:`ssd`, by the chunked SSD algorithm (Dao & Gu 2024, section 6 and their
    ``ssd_minimal`` listing): the quadratic form inside chunks of ``chunk`` tokens, and the SSM state
    passed between chunks by a recurrence over chunk boundaries (itself a small segsum over chunks).
    Work is ``L * chunk`` instead of ``L²``; used for training, where ``L`` is a multiple of ``chunk``.

    Args:
        x, dt, A, B, C: as :func:`ssd`; ``L`` must be a multiple of ``chunk``.

    Returns:
        ``y`` float32 ``(batch, L, heads, head_dim)``.

    Raises:
        InputSpecError: ``L`` is not a multiple of ``chunk``.
    """
    b, L, H, P = x.shape
    N = B.shape[-1]
    if L % chunk:
        raise InputSpecError(f"sequence length {L} is not a multiple of the SSD chunk {chunk}; use ssd()")
    c, Q = L // chunk, chunk
    xdt = (x * dt.unsqueeze(-1)).reshape(b, c, Q, H, P).permute(0, 3, 1, 2, 4)   # (b, H, c, Q, P)
    a = (dt * A).reshape(b, c, Q, H).permute(0, 3, 1, 2)                          # (b, H, c, Q)
    Bc, Cc = B.reshape(b, c, Q, N), C.reshape(b, c, Q, N)
    a_cs = torch.cumsum(a, dim=-1)                                                 # within-chunk running sums
    # 1. inside each chunk: the quadratic form; segment sums as differences of the within-chunk
    # running sums (short, so no precision issue), upper triangle set to -inf before exp
    seg = (a_cs.unsqueeze(-1) - a_cs.unsqueeze(-2)).masked_fill(~_lower(Q, x.device, strict=False), float("-inf"))
    scores = torch.matmul(Cc, Bc.transpose(-1, -2))                                 # (b, c, Q, Q)
    y = torch.matmul(torch.exp(seg) * scores.unsqueeze(1), xdt)                     # (b, H, c, Q, P)
    # 2. each chunk's contribution to the state at its end
    to_end = torch.exp(a_cs[..., -1:] - a_cs)                                      # (b, H, c, Q)
    states = torch.einsum("bcsn,bhcs,bhcsp->bchpn", Bc, to_end, xdt)               # (b, c, H, P, N)
    # 3. states entering each chunk: recurrence over chunk boundaries (zero initial state)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)           # (b, c + 1, H, P, N)
    across = torch.exp(segsum(F.pad(a_cs[..., -1], (1, 0))))                        # (b, H, c + 1, c + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", across, states)[:, :-1]             # (b, c, H, P, N)
    # 4. the entering state's contribution to each output
    y = y + torch.einsum("bctn,bchpn,bhct->bhctp", Cc, states, torch.exp(a_cs))
    return y.permute(0, 2, 3, 1, 4).reshape(b, L, H, P)


# ---- the module ---------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) over the last dim: ``x / sqrt(mean(x²) + eps) * weight``."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MambaBlock(nn.Module):
    """Residual Mamba-2 block: ``h + out_proj(norm(SSM(silu(conv(x, B, C)), Δ) * silu(z)))`` on ``RMSNorm(h)``.

    ``in_proj`` maps ``d_model`` to ``[z (d_inner), xBC (d_inner + 2 d_state), Δ (heads)]``; the causal
    depthwise conv1d (kernel ``d_conv``, left padding) runs over ``xBC``; ``Δ = softplus(Δ + dt_bias)``;
    ``A = -exp(A_log)`` per head; ``D`` per head skips the SSM.

    ``forward(h)``: ``h`` float32 ``(batch, L, d_model)`` -> ``(batch, L, d_model)`` (parallel form);
    ``forward(h, return_state=True)`` also gives the conv and SSM states after the last token.
    ``step(h, conv_state, ssm_state)``: ``h`` ``(batch, 1, d_model)``, ``conv_state`` ``(batch,
    conv_channels, d_conv - 1)``, ``ssm_state`` ``(batch, heads, head_dim, d_state)`` -> the same three
    for the next token (recurrent form).
    """

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        if cfg.d_inner % cfg.head_dim:
            raise InputSpecError(f"d_inner {cfg.d_inner} is not a multiple of head_dim {cfg.head_dim}; change one")
        self.cfg = cfg
        H = cfg.n_heads
        self.norm = RMSNorm(cfg.d_model)
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_inner + cfg.conv_channels + H, bias=False)
        self.conv = nn.Conv1d(cfg.conv_channels, cfg.conv_channels, cfg.d_conv, groups=cfg.conv_channels, bias=True)
        # Δ init: softplus(dt_bias) log-uniform in [dt_min, dt_max] (Gu & Dao 2023, appendix); A in [1, 16]
        dt = torch.exp(torch.rand(H) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(H))
        self.out_norm = RMSNorm(cfg.d_inner)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=False)

    def _split(self, zxbcdt):
        c = self.cfg
        return torch.split(zxbcdt, [c.d_inner, c.conv_channels, c.n_heads], dim=-1)

    def _ssm_inputs(self, xbc, dt):
        c = self.cfg
        x, B, C = torch.split(xbc, [c.d_inner, c.d_state, c.d_state], dim=-1)
        return x, B, C, F.softplus(dt + self.dt_bias), -torch.exp(self.A_log)

    def _out(self, h, y, z):
        return h + self.out_proj(self.out_norm(y * F.silu(z)))

    def forward(self, h, return_state: bool = False):
        c = self.cfg
        b, L, _ = h.shape
        z, xbc, dt = self._split(self.in_proj(self.norm(h)))
        xbc_t = F.pad(xbc.transpose(1, 2), (c.d_conv - 1, 0))         # (b, ch, L + k - 1)
        if self.training:  # k shifted multiply-adds: CPU depthwise-conv backward is slow
            w = self.conv.weight[:, 0, :]
            xbc_c = self.conv.bias[:, None] + sum(xbc_t[:, :, j:j + L] * w[:, j:j + 1] for j in range(c.d_conv))
        else:
            xbc_c = self.conv(xbc_t)
        x, B, C, dt, A = self._ssm_inputs(F.silu(xbc_c).transpose(1, 2), dt)  # (b, L, .)
        x = x.reshape(b, L, c.n_heads, c.head_dim)
        if not torch.compiler.is_exporting() and c.chunk and not return_state and L % c.chunk == 0:
            res = ssd_chunked(x, dt, A, B, C, c.chunk)  # eager (training, 384-token evaluation windows)
        else:  # export (any length: the chunk count would be frozen by the exporter), other lengths
            res = ssd(x, dt, A, B, C, return_state)
        y = res[0] if return_state else res
        y = (y + x * self.D[:, None]).reshape(b, L, c.d_inner)
        out = self._out(h, y, z)
        if not return_state:
            return out
        return out, xbc_t[:, :, -(c.d_conv - 1):], res[1]

    def step(self, h, conv_state, ssm_state):
        c = self.cfg
        b = h.shape[0]
        z, xbc, dt = self._split(self.in_proj(self.norm(h[:, 0])))    # (b, .)
        window = torch.cat([conv_state, xbc.unsqueeze(-1)], dim=-1)    # (b, ch, k)
        xbc_c = F.silu((window * self.conv.weight[:, 0, :]).sum(-1) + self.conv.bias)
        x, B, C, dt, A = self._ssm_inputs(xbc_c, dt)                   # dt (b, H)
        x = x.reshape(b, c.n_heads, c.head_dim)
        dA = torch.exp(dt * A)                                          # (b, H)
        state = ssm_state * dA[:, :, None, None] + (dt[:, :, None] * x).unsqueeze(-1) * B[:, None, None, :]
        y = torch.matmul(state, C[:, None, :, None]).squeeze(-1)       # (b, H, P)
        y = (y + x * self.D[:, None]).reshape(b, c.d_inner)
        return self._out(h, y.unsqueeze(1), z.unsqueeze(1)), window[:, :, 1:], state


class Mamba(nn.Module):
    """Mamba-2 language model: embedding -> ``n_layer`` :class:`MambaBlock` -> RMSNorm -> tied LM head.

    ``forward(input_ids)``: int64 ``(batch, seq)`` token ids in ``[0, vocab_size)`` -> ``(logits,)``, a
    1-tuple with float32 ``(batch, seq, vocab_size)`` next-token logits (the zoo graph; the tuple keeps
    the calling convention of the GPT's training loop). Causal: logits at ``t`` depend on tokens ``<= t``.

    ``step(input_ids, *states)``: one token int64 ``(batch, 1)`` and ``2 * n_layer`` states ordered
    ``conv_state.0, ssm_state.0, conv_state.1, ...`` (see :func:`state_shapes`) -> ``(logits (batch, 1,
    vocab), *next_states)`` in the same order.

    ``prefill(input_ids)`` -> ``(logits, *states)``: the parallel form plus the states after the last
    token, to continue with ``step``.

    ``state_dict()`` holds float16 tensors (the storage precision); ``load_state_dict`` casts back.
    """

    def __init__(self, cfg: MambaConfig = TARGET):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model)
        nn.init.normal_(self.emb.weight, 0.0, 0.02)
        for blk in self.blocks:
            nn.init.normal_(blk.in_proj.weight, 0.0, 0.02)
            nn.init.normal_(blk.out_proj.weight, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))  # GPT-2 residual scaling
        self.register_state_dict_post_hook(fp16_storage)

    def _head(self, x):
        return F.linear(self.norm_f(x), self.emb.weight)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for blk in self.blocks:
            x = blk(x)
        return (self._head(x),)

    def prefill(self, input_ids):
        x = self.emb(input_ids)
        states = []
        for blk in self.blocks:
            x, cs, ss = blk(x, return_state=True)
            states += [cs, ss]
        return (self._head(x), *states)

    def step(self, input_ids, *states):
        if len(states) != 2 * self.cfg.n_layer:
            raise InputSpecError(f"step() takes {2 * self.cfg.n_layer} states (conv and SSM per layer), "
                                 f"got {len(states)}")
        x = self.emb(input_ids)
        out = []
        for i, blk in enumerate(self.blocks):
            x, cs, ss = blk.step(x, states[2 * i], states[2 * i + 1])
            out += [cs, ss]
        return (self._head(x), *out)


class _StepGraph(nn.Module):
    def __init__(self, model: Mamba):
        super().__init__()
        self.model = model


def StepGraph(model: Mamba) -> nn.Module:
    """The module exported as the step graph: ``forward(input_ids, conv_state_0, ssm_state_0, ...)`` =
    ``model.step(...)``. ``torch.export`` needs one named argument per input (a ``*states`` signature
    is one pytree input), so the class is made with exactly ``2 * n_layer`` state arguments."""
    import inspect

    names = ["input_ids"] + [n.replace(".", "_") for n in state_names(model.cfg)]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD

    def forward(self, *args):
        return self.model.step(*args)

    # the same explicit-signature technique as deepship.pipeline.prune.load_pt2_module
    forward.__signature__ = inspect.Signature([inspect.Parameter("self", kind)] +
                                              [inspect.Parameter(n, kind) for n in names])
    cls = type(f"MambaStepGraph{model.cfg.n_layer}", (_StepGraph,), {"forward": forward, "__doc__": StepGraph.__doc__})
    return cls(model)


# ---- state names and shapes ------------------------------------------------------------------------

def state_names(cfg: MambaConfig, prefix: str = "") -> list[str]:
    """``[conv_state.0, ssm_state.0, conv_state.1, ...]`` (``prefix="next_"`` for the outputs)."""
    return [f"{prefix}{kind}.{i}" for i in range(cfg.n_layer) for kind in ("conv_state", "ssm_state")]


def state_shapes(cfg: MambaConfig, batch: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the step graph's state inputs: ``conv_state.{i}`` ``(batch, conv_channels, d_conv - 1)``
    and ``ssm_state.{i}`` ``(batch, n_heads, head_dim, d_state)``."""
    conv = (batch, cfg.conv_channels, cfg.d_conv - 1)
    ssm = (batch, cfg.n_heads, cfg.head_dim, cfg.d_state)
    return {n: (conv if n.startswith("conv") else ssm) for n in state_names(cfg)}


def zero_states(cfg: MambaConfig, batch: int) -> dict[str, np.ndarray]:
    """The states before the first token: float32 zeros of :func:`state_shapes`."""
    return {n: np.zeros(s, np.float32) for n, s in state_shapes(cfg, batch).items()}


def step_spec(cfg: MambaConfig) -> ModelSpec:
    """A :class:`ModelSpec` describing the step graph (for :func:`deepship.exporters.onnx.export_onnx`):
    inputs ``input_ids:int64[batch,1]`` and the states (dynamic ``batch``), outputs ``logits`` and the
    next states. States for the random parity inputs lie in [-1, 1]."""
    shapes = state_shapes(cfg, 1)
    inputs = [TensorSpec("input_ids", ("batch", 1), "int64", 0, cfg.vocab_size)]
    inputs += [TensorSpec(n, ("batch",) + shapes[n][1:], "float32", -1.0, 1.0) for n in state_names(cfg)]
    return ModelSpec(name="mamba-step", task="language-modeling", build=None, inputs=inputs,
                     output_names=["logits"] + state_names(cfg, "next_"))


# ---- step graph: export, parity, generation ------------------------------------------------------------

def step_session_torch(model: Mamba, threads: int | None = None):
    """A :class:`~deepship.runtimes.session.TorchSession` running ``model.step`` with the step graph's names."""
    from ..runtimes.session import TorchSession

    spec = step_spec(model.cfg)
    return TorchSession(StepGraph(model).eval(), [t.name for t in spec.inputs], spec.output_names, threads=threads)


def stream_logits(session: Any, cfg: MambaConfig, ids: np.ndarray, states: dict | None = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run a step-graph session token by token over ``ids``.

    Args:
        session: a Session with the step graph's inputs and outputs (ONNX Runtime or torch).
        ids: int64 ``(batch, n)``.
        states: the states to start from (default zeros).

    Returns:
        ``(logits float32 (batch, n, vocab), states after the last token)``.
    """
    ids = np.asarray(ids, np.int64)
    st = dict(states) if states is not None else zero_states(cfg, ids.shape[0])
    out = []
    for t in range(ids.shape[1]):
        res = session.run({"input_ids": np.ascontiguousarray(ids[:, t:t + 1]), **st})
        out.append(res["logits"])
        st = {n: res["next_" + n] for n in state_names(cfg)}
    return np.concatenate(out, 1), st


def generate(session: Any, cfg: MambaConfig, prompt: Sequence[int] | np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy generation over a step-graph session (the prompt is streamed through the step graph too).

    Args:
        prompt: int64 ``(n,)`` or ``(batch, n)`` token ids, ``n >= 1``.
        max_new_tokens: tokens to generate (>= 1).

    Returns:
        int64 ``(batch, max_new_tokens)`` generated ids.

    Raises:
        InputSpecError: an empty prompt, an id outside the vocabulary, or ``max_new_tokens < 1``.
    """
    p = np.asarray(prompt, np.int64)
    p = p[None] if p.ndim == 1 else p
    if p.size == 0 or p.shape[1] == 0:
        raise InputSpecError("the prompt is empty; give at least one token")
    if p.min() < 0 or p.max() >= cfg.vocab_size:
        bad = int(p.min() if p.min() < 0 else p.max())
        raise InputSpecError(f"unknown token id {bad}; ids are in [0, {cfg.vocab_size})")
    if max_new_tokens < 1:
        raise InputSpecError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    logits, st = stream_logits(session, cfg, p)
    nxt = logits[:, -1].argmax(-1)
    out = [nxt]
    for _ in range(max_new_tokens - 1):
        res = session.run({"input_ids": nxt[:, None].astype(np.int64), **st})
        st = {n: res["next_" + n] for n in state_names(cfg)}
        nxt = res["logits"][:, -1].argmax(-1)
        out.append(nxt)
    return np.stack(out, 1).astype(np.int64)


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


def export_step_graph(model: Mamba, out_path: str | Path, steps: int = 32, atol: float = 1e-4) -> dict[str, Any]:
    """Export the step graph to ONNX (dynamo exporter, dynamic ``batch``) and check it.

    Checks: parity with ``model.step`` at batch 2 and 3 on random states (by
    :func:`deepship.exporters.onnx.export_onnx`), then ``steps`` tokens streamed through ONNX Runtime
    against the whole-sequence torch forward (:func:`step_parity`, 2 rows of held-out text).

    Returns:
        ``{"path", "files", "parity": export parity, "steps": step parity}``.

    Raises:
        ExportError: the export failed, fixed the batch dim, or either parity check failed (> ``atol``).
    """
    from ..exporters.onnx import export_onnx
    from ..runtimes.session import OrtSession

    model = model.eval()
    res = export_onnx(StepGraph(model).eval(), step_spec(model.cfg), out_path, atol=atol)
    held = gpt.corpus()[1]
    ids = np.stack([held[:steps], held[1000:1000 + steps]])
    sp = step_parity(OrtSession(res.path, threads=1), model, ids)
    sp["ok"] = sp["max_abs_logits"] <= atol and sp["max_abs_state"] <= atol
    if not sp["ok"]:
        raise ExportError(f"step-graph parity failed over {steps} tokens: max abs logits {sp['max_abs_logits']:.3g}, "
                          f"states {sp['max_abs_state']:.3g} > {atol:g}")
    return {"path": res.path, "files": res.files, "parity": res.parity, "steps": sp}


# ---- data, metric --------------------------------------------------------------------------------------

def dataset(cfg: MambaConfig = TARGET) -> Dataset:
    """The report's data: :func:`deepship.models.gpt.dataset`'s windows (held-out ``test``: 32 x 64
    tokens; ``train``: 256 x 64 for calibration) with ``input_ids`` only (no KV cache here)."""
    ds = gpt.dataset(gpt.TARGET)
    keep = lambda s: Split({"input_ids": s.inputs["input_ids"]}, s.targets)  # noqa: E731
    return Dataset(keep(ds.train), keep(ds.test), ds.source)


def perplexity(session: Any, cfg: MambaConfig = TARGET, ids: np.ndarray | None = None, batch: int = 8) -> float:
    """Held-out perplexity of a session (inputs ``input_ids``, output ``logits``), by
    :func:`deepship.models.gpt.perplexity`: all held-out tokens (default) in non-overlapping windows of
    ``cfg.context`` tokens, as for the GPT, so the numbers compare."""
    return gpt.perplexity(session, ids=ids, window=cfg.context, batch=batch)


# ---- training and spec -----------------------------------------------------------------------------------

RECIPE = {
    "arch": TARGET.to_dict(), "tokenizer": gpt.tokenizer_hash(), "steps": 700, "batch_size": 2,
    "seq_len": TARGET.context, "lr": 5e-3, "min_lr_ratio": 0.1, "warmup": 50, "weight_decay": 0.1,
    "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "threads": 1,
}


def train_mamba(model: Mamba, ds: Dataset | None, recipe: dict) -> dict:
    """The GPT's seeded loop (:func:`deepship.models.gpt.train_gpt`) on this model: random training
    windows, AdamW (no decay on 1-D parameters: norms, ``A_log``, ``D``, ``dt_bias``, conv bias),
    warm-up + cosine; weights rounded to float16 at the end.

    Returns:
        ``{"train_s", "final_loss", "tokens_seen"}``.
    """
    return gpt.train_gpt(model, ds, recipe, progress=train_log("mamba"))


def build(arch: dict | None = None) -> Mamba:
    """An untrained :class:`Mamba` with :data:`TARGET` updated by ``arch``."""
    return Mamba(MambaConfig.from_dict({**TARGET.to_dict(), **(arch or {})}))


def _plan(default_plan: list) -> list:
    """Report rows: FP32 torch (baseline), FP32 ONNX, INT8 dynamic, INT4 weight-only (MatMulNBits, block 32)."""
    return [("fp32-onnx", "export", "onnx", {}, "fp32-torch"),
            ("int8-dynamic", "quantize", "int8-dynamic", {}, "fp32-onnx"),
            ("int4-b32", "quantize", "int4-weight-only", {"block_size": 32}, "fp32-onnx")]


def _step_graph_path(ctx: Any) -> Path:
    from ..utils import cache_root, stable_hash

    return cache_root() / "mamba" / f"step-{stable_hash([ctx.identity(), 'step', 1])}" / "step.onnx"


def step_graph(ctx: Any) -> Path:
    """The FP32 step graph of a ``mamba`` :class:`~deepship.pipeline.stages.ModelContext`, exported
    (with the 32-token parity check) on first use and cached under ``$DEEPSHIP_CACHE/mamba``."""
    p = _step_graph_path(ctx)
    if not p.is_file():
        p.parent.mkdir(parents=True, exist_ok=True)
        export_step_graph(ctx.module(), p)
    return p


def report_measures(ctx: Any, variant: Any, session: Any, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Extra report measures (the ModelSpec ``measure`` hook), for the FP32 torch and FP32 ONNX rows:
    greedy streaming generation through the step graph (torch ``step`` or the ONNX step graph) after a
    64-token held-out prompt, batch 1.

    Returns:
        ``{"step_tok_s_b1": generated tokens/s (prompt streaming excluded), median of ``repeats``}``, or
        ``{}`` for other variants.
    """
    from ..runtimes.session import OrtSession

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


def config_of(spec: ModelSpec) -> MambaConfig:
    """The :class:`MambaConfig` of a ``mamba`` spec.

    Raises:
        InputSpecError: the spec is not this module's.
    """
    cfg = (spec.extra or {}).get("config")
    if cfg is None or spec.extra.get("family") != "mamba":
        raise InputSpecError(f"model '{spec.name}' is not a Mamba language model; use mamba")
    return MambaConfig.from_dict(cfg)


def mamba_spec() -> ModelSpec:
    """The ``mamba`` zoo entry."""
    cfg = TARGET
    return ModelSpec(
        name="mamba", task="language-modeling", build=build,
        inputs=[TensorSpec("input_ids", ("batch", "seq"), "int64", 0, cfg.vocab_size)], output_names=["logits"],
        metric=gpt.PERPLEXITY, data=lambda: dataset(cfg), recipe=dict(RECIPE), train=train_mamba,
        evaluate=lambda session: perplexity(session, cfg), baselines=lambda ds: [gpt.bigram_baseline()],
        description=(f"Mamba-2 selective SSM LM ({cfg.n_layer} blocks, d_model {cfg.d_model}, d_state {cfg.d_state}, "
                     "SSD parallel form + recurrent step graph), tiny-shakespeare byte-level BPE"),
        plan=_plan, measure=report_measures, extra={"config": cfg.to_dict(), "family": "mamba"},
    )


def load_trained() -> tuple[Mamba, MambaConfig]:
    """The trained ``mamba`` module (committed weights, cache, or a training run) and its config."""
    from .train import trained_model

    spec = mamba_spec()
    model, _ = trained_model(spec)
    return model, config_of(spec)
