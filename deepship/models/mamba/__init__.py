"""Mamba family: a selective state-space language model (Mamba, in its Mamba-2 "SSD" form) on tiny-shakespeare.

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
2. the *step graph* for streaming generation (:func:`deepship.exporters.mamba.export_step_graph`,
   parity-checked by the family adapter :mod:`deepship.pipeline.arch.mamba`): ``input_ids`` int64
   ``(batch, 1)`` and, per layer ``i``, ``conv_state.{i}`` float32 ``(batch, conv_channels, d_conv - 1)``
   (the last inputs of the causal conv) and ``ssm_state.{i}`` float32 ``(batch, n_heads, head_dim,
   d_state)`` (the SSM state ``H``) -> ``logits`` ``(batch, 1, vocab)``, ``next_conv_state.{i}``,
   ``next_ssm_state.{i}``. Constant memory per token, whatever the length of the stream.

Reproduce the committed weights (``deepship/models/weights/mamba.safetensors``)::

    DEEPSHIP_TRAIN_LOG=1 optimize train mamba --out deepship/models/weights
"""
from __future__ import annotations

from ...errors import InputSpecError
from .. import gpt
from ..spec import ModelSpec, TensorSpec
from ..train import trained_model
from .data import dataset, perplexity
from .model import (TARGET, Mamba, MambaBlock, MambaConfig, RMSNorm, StepGraph, generate, segsum, ssd, ssd_chunked,  # noqa: F401
                    state_names, state_shapes, step_spec, stream_logits, zero_states)
from .train import RECIPE, train_mamba


def build(arch: dict | None = None) -> Mamba:
    """An untrained :class:`Mamba` with :data:`TARGET` updated by ``arch``."""
    return Mamba(MambaConfig.from_dict({**TARGET.to_dict(), **(arch or {})}))


def config_of(spec: ModelSpec) -> MambaConfig:
    """The :class:`MambaConfig` of a ``mamba`` spec.

    Raises:
        InputSpecError: the spec is not this module's.
    """
    cfg = (spec.extra or {}).get("config")
    if cfg is None or spec.family != "mamba":
        raise InputSpecError(f"model '{spec.name}' is not a Mamba language model; use mamba")
    return MambaConfig.from_dict(cfg)


def mamba_spec() -> ModelSpec:
    """The ``mamba`` zoo entry."""
    cfg = TARGET
    return ModelSpec(
        name="mamba", task="language-modeling", build=build,
        inputs=[TensorSpec("input_ids", ("batch", "seq"), "int64", 0, cfg.vocab_size)], output_names=["logits"],
        metric=gpt.PERPLEXITY, data=lambda: dataset(cfg), recipe=dict(RECIPE), train=train_mamba,
        evaluate=lambda session: perplexity(session, cfg), baselines=lambda ds: [gpt.bigram_baseline()], family="mamba",
        description=(f"Mamba-2 selective SSM LM ({cfg.n_layer} blocks, d_model {cfg.d_model}, d_state {cfg.d_state}, "
                     "SSD parallel form + recurrent step graph), tiny-shakespeare byte-level BPE"),
        extra={"config": cfg.to_dict()},
    )


def load_trained() -> tuple[Mamba, MambaConfig]:
    """The trained ``mamba`` module (committed weights, cache, or a training run) and its config."""
    spec = mamba_spec()
    model, _ = trained_model(spec)
    return model, config_of(spec)


#: the zoo entries of this family (read by :mod:`deepship.models.zoo`)
SPECS = {"mamba": mamba_spec}
