"""The sentence encoder module (torch; the Hugging Face model itself comes from ``transformers``)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def mean_pool_normalize(hidden, mask, normalize: bool = True):
    """Mean of ``hidden`` (batch, seq, h) over positions where ``mask`` (batch, seq) is 1, then L2
    normalization (``x / max(|x|, 1e-12)``), exactly as sentence-transformers' Pooling + Normalize."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(1)
    count = torch.clamp(m.sum(1), min=1e-9)
    emb = summed / count
    if normalize:
        emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    return emb


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder + mean pooling over the attention mask + L2 normalization.

    ``forward(input_ids int64 (B, S), attention_mask int64 (B, S))`` ->
    ``(sentence_embedding float32 (B, H), last_hidden_state float32 (B, S, H))``.
    """

    def __init__(self, model: nn.Module, normalize: bool = True):
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool_normalize(hidden, attention_mask, self.normalize), hidden


def load_encoder(path: str | Path, normalize: bool = True) -> SentenceEncoder:
    """The :class:`SentenceEncoder` of the HF folder ``path`` in eval mode (``AutoModel``, offline)."""
    from transformers import AutoModel  # heavy: imported when a model is built

    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    return SentenceEncoder(model.eval(), normalize).eval()
