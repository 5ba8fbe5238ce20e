"""The Mamba-2 module, its config, the SSD kernels and the step graph's signature (torch only); see
:mod:`deepship.models.mamba`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import InputSpecError
from ..spec import ArchConfig, ModelSpec, TensorSpec
from ..train import fp16_storage

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

    # the same explicit-signature technique as deepship.models.user.load_pt2_module
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
    """A :class:`ModelSpec` describing the step graph (for :func:`deepship.exporters.mamba.export_step_graph`):
    inputs ``input_ids:int64[batch,1]`` and the states (dynamic ``batch``), outputs ``logits`` and the
    next states. States for the random parity inputs lie in [-1, 1]."""
    shapes = state_shapes(cfg, 1)
    inputs = [TensorSpec("input_ids", ("batch", 1), "int64", 0, cfg.vocab_size)]
    inputs += [TensorSpec(n, ("batch",) + shapes[n][1:], "float32", -1.0, 1.0) for n in state_names(cfg)]
    return ModelSpec(name="mamba-step", task="language-modeling", build=None, inputs=inputs,
                     output_names=["logits"] + state_names(cfg, "next_"))


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
