"""LoRA on an encoder for text classification (MiniLM: which character speaks a line).

PEFT's LoRA on the encoder's attention projections and a trainable linear head over mean pooling,
trained by the loop the decoder recipe uses (:func:`deepship.pipeline.finetune._fit`); a frozen-encoder
logistic regression (scikit-learn) is the reference.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import InputSpecError
from . import DEFAULT_TARGETS, LoraOptions, _fit, lora_model, options_dict

#: the attention projections of a BERT encoder (transformers' BertSelfAttention names)
ENCODER_TARGETS = ("query", "value")


class PooledClassifier(nn.Module):
    """Mean-pooled encoder output -> linear head: ``forward(input_ids, attention_mask)`` int64
    ``(batch, seq)`` -> float32 logits ``(batch, n_classes)``; ``encoder`` is a transformers model
    (``last_hidden_state``), wrapped by PEFT or not."""

    def __init__(self, encoder: nn.Module, hidden: int, n_classes: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(hidden, n_classes)

    def embed(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids, attention_mask))


def _scores(y: np.ndarray, pred: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y, pred)), "macro_f1": float(f1_score(y, pred, average="macro"))}


def train_classifier(encoder: nn.Module, tokenize: Callable[[list[str]], dict], train: tuple[list[str], np.ndarray],
                     test: tuple[list[str], np.ndarray], opts: LoraOptions, probe: bool = True,
                     progress: Callable[[str], None] | None = None) -> tuple[nn.Module, dict]:
    """LoRA (PEFT) on an encoder's attention with a trainable linear head over mean pooling, for text
    classification; with ``probe`` also the frozen encoder + logistic regression (scikit-learn) on the
    same pooled embeddings, the reference a LoRA run must beat.

    Args:
        encoder: a transformers encoder (e.g. all-MiniLM-L6-v2's ``BertModel``), not changed.
        tokenize: ``texts -> {"input_ids", "attention_mask"}`` int64 ``(n, seq)`` arrays.
        train, test: ``(texts, labels int64 (n,))``.
        opts: rank, alpha, targets (default :data:`ENCODER_TARGETS` when they are the GPT's), steps,
            lr, batch size, seed, threads.

    Returns:
        ``(classifier, results)``: the :class:`PooledClassifier` (PEFT-wrapped encoder) and
        ``{"lora": {"accuracy", "macro_f1"}, "probe": {...} | None, "train": train stats,
        "classes", "train_examples", "test_examples", "chance": majority-class accuracy}``.

    Raises:
        InputSpecError: bad options (:meth:`LoraOptions.check`), or fewer than 2 classes.
    """
    (tr_x, tr_y), (te_x, te_y) = train, test
    n_classes = int(max(tr_y.max(), te_y.max())) + 1
    if n_classes < 2:
        raise InputSpecError("the classification data has one class; give at least two")
    if list(opts.targets) == list(DEFAULT_TARGETS):
        opts = replace(opts, targets=list(ENCODER_TARGETS))
    torch.manual_seed(int(opts.seed))
    model = PooledClassifier(lora_model(encoder, opts), encoder.config.hidden_size, n_classes)
    enc_tr, enc_te = tokenize(list(tr_x)), tokenize(list(te_x))
    rng = np.random.default_rng(int(opts.seed))

    def loss() -> torch.Tensor:
        idx = rng.integers(0, len(tr_y), int(opts.batch_size))
        logits = model(torch.from_numpy(enc_tr["input_ids"][idx]), torch.from_numpy(enc_tr["attention_mask"][idx]))
        return F.cross_entropy(logits, torch.from_numpy(tr_y[idx]))

    stats = _fit(model, opts, loss, progress, weight_decay=0.01)

    @torch.no_grad()
    def run(m, enc, fn):
        return np.concatenate([fn(m, torch.from_numpy(enc["input_ids"][i:i + 64]),
                                  torch.from_numpy(enc["attention_mask"][i:i + 64])).numpy()
                               for i in range(0, len(enc["input_ids"]), 64)])

    res = {"lora": _scores(te_y, run(model, enc_te, PooledClassifier.forward).argmax(1)), "probe": None}
    if probe:
        from sklearn.linear_model import LogisticRegression

        frozen = PooledClassifier(encoder, encoder.config.hidden_size, n_classes).eval()
        emb = lambda enc: run(frozen, enc, PooledClassifier.embed)  # noqa: E731
        clf = LogisticRegression(max_iter=2000, C=10.0).fit(emb(enc_tr), tr_y)
        res["probe"] = _scores(te_y, clf.predict(emb(enc_te)))
    res.update(train=stats, classes=n_classes, train_examples=len(tr_y), test_examples=len(te_y),
               chance=float(np.bincount(te_y).max() / len(te_y)), options=options_dict(opts))
    return model, res
