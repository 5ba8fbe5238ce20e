"""The streaming recognizer module and its config (torch only); see :mod:`deepship.models.asr`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec import ArchConfig, TensorSpec
from ..train import fp16_storage
from . import data as S

SUBSAMPLING = 4
SUB_CONTEXT = 3  # fbank frames the subsampling convolutions need from the previous chunk


@dataclass(frozen=True)
class ASRConfig(ArchConfig):
    """Architecture and streaming configuration.

    ``chunk`` is in encoder frames (40 ms each): ``chunk=1`` is a 40 ms chunk of 4 fbank frames.
    ``left_context`` is the attention window in encoder frames (32 = 1.28 s).
    """

    n_mels: int = S.N_MELS
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    ff_mult: int = 2
    conv_kernel: int = 15
    sub_channels: int = 64
    left_context: int = 32
    chunk: int = 1
    lstm_hidden: int = 128
    vocab: int = len(S.VOCAB)

    @property
    def chunk_frames(self) -> int:
        """fbank frames per chunk (``4 * chunk``)."""
        return SUBSAMPLING * self.chunk

    @property
    def chunk_ms(self) -> float:
        return self.chunk_frames * S.FRAME_SHIFT_MS

    @property
    def algorithmic_latency_ms(self) -> float:
        """Chunk duration plus the fbank window overhang (25 ms window, 10 ms shift); no lookahead."""
        return self.chunk_ms + (S.FRAME_LENGTH_MS - S.FRAME_SHIFT_MS)


DEFAULT = ASRConfig()


class ConformerBlock(nn.Module):
    """One Conformer block with explicit attention and convolution caches (see the module docstring)."""

    def __init__(self, cfg: ASRConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        self.cfg = cfg
        self.ff1 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.ff_mult * d), nn.SiLU(), nn.Linear(cfg.ff_mult * d, d))
        self.ff2 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.ff_mult * d), nn.SiLU(), nn.Linear(cfg.ff_mult * d, d))
        self.ln_att = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_conv = nn.LayerNorm(d)
        self.pw1 = nn.Linear(d, 2 * d)
        self.dw = nn.Conv1d(d, d, cfg.conv_kernel, groups=d)
        self.ln_dw = nn.LayerNorm(d)
        self.pw2 = nn.Linear(d, d)
        self.ln_out = nn.LayerNorm(d)
        self.num_heads = h  # the name torch-pruning checks (see deepship.pipeline.prune.why_not_structured)

    def forward(self, x: torch.Tensor, att_cache: torch.Tensor, conv_cache: torch.Tensor, mask: torch.Tensor):
        """x ``(B, N, d)``; att_cache ``(B, L, 2d)``; conv_cache ``(B, d, K-1)``; mask bool ``(N, L+N)``."""
        B, N, d = x.shape
        x = x + 0.5 * self.ff1(x)
        # self-attention over [cache, chunk]
        q, k, v = self.qkv(self.ln_att(x)).chunk(3, dim=-1)
        kv = torch.cat([att_cache, torch.cat([k, v], dim=-1)], dim=1)  # (B, L+N, 2d)
        L = att_cache.shape[1]
        new_att = kv[:, kv.shape[1] - L:]
        kk, vv = kv.split(d, dim=-1)
        hd = d // self.num_heads
        q = q.reshape(B, N, self.num_heads, hd).transpose(1, 2)
        kk = kk.reshape(B, -1, self.num_heads, hd).transpose(1, 2)
        vv = vv.reshape(B, -1, self.num_heads, hd).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(B, N, d))
        # convolution module with a causal depthwise convolution
        y = F.glu(self.pw1(self.ln_conv(x)), dim=-1).transpose(1, 2)  # (B, d, N)
        y = torch.cat([conv_cache, y], dim=2)
        new_conv = y[:, :, y.shape[2] - conv_cache.shape[2]:]
        y = self.dw(y).transpose(1, 2)  # (B, N, d)
        x = x + self.pw2(F.silu(self.ln_dw(y)))
        x = x + 0.5 * self.ff2(x)
        return self.ln_out(x), new_att, new_conv


class StreamingConformerCTC(nn.Module):
    """Conformer + LSTM + CTC, streamed chunk by chunk with explicit state (see the module docstring)."""

    def __init__(self, cfg: ASRConfig = DEFAULT, mean: np.ndarray | None = None, std: np.ndarray | None = None):
        super().__init__()
        self.cfg = cfg
        c = cfg.sub_channels
        self.conv1 = nn.Conv2d(1, c, 3, stride=2)
        self.conv2 = nn.Conv2d(c, c, 3, stride=2)
        f = ((cfg.n_mels - 3) // 2 + 1 - 3) // 2 + 1
        self.sub_out = nn.Linear(c * f, cfg.d_model)
        self.blocks = nn.ModuleList([ConformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.lstm = nn.LSTM(cfg.d_model, cfg.lstm_hidden, batch_first=True)
        self.head = nn.Linear(cfg.lstm_hidden, cfg.vocab)
        self.register_buffer("mean", torch.as_tensor(mean if mean is not None else np.zeros(cfg.n_mels), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std if std is not None else np.ones(cfg.n_mels), dtype=torch.float32))
        self.register_state_dict_post_hook(fp16_storage)  # committed weights stored as float16 (2.7 MB)

    def _mask(self, n: int, chunk: int) -> torch.Tensor:
        """Bool ``(n, L+n)``: frame i (chunk c = i // chunk) sees keys c*chunk-L .. c*chunk+chunk-1."""
        L = self.cfg.left_context
        i = torch.arange(n).unsqueeze(1)
        j = torch.arange(L + n).unsqueeze(0) - L  # key position relative to the first new frame
        c0 = (i // chunk) * chunk
        return (j >= c0 - L) & (j < c0 + chunk)

    def _run(self, x, sub_cache, att_cache, conv_cache, lstm_h, lstm_c, chunk: int):
        xn = (x - self.mean) / self.std
        xs = torch.cat([sub_cache, xn], dim=1)
        new_sub = xs[:, xs.shape[1] - SUB_CONTEXT:]
        y = F.relu(self.conv2(F.relu(self.conv1(xs.unsqueeze(1)))))  # (B, c, N, f)
        B, C, N, Fq = y.shape
        h = self.sub_out(y.permute(0, 2, 1, 3).reshape(B, N, C * Fq))
        mask = self._mask(N, chunk)
        atts, convs = [], []
        for i, blk in enumerate(self.blocks):
            h, a, cv = blk(h, att_cache[:, i], conv_cache[:, i], mask)
            atts.append(a)
            convs.append(cv)
        o, (hn, cn) = self.lstm(h, (lstm_h.unsqueeze(0), lstm_c.unsqueeze(0)))
        logp = F.log_softmax(self.head(o), dim=-1)
        return logp, new_sub, torch.stack(atts, 1), torch.stack(convs, 1), hn[0], cn[0]

    def forward(self, x, sub_cache, att_cache, conv_cache, lstm_h, lstm_c):
        """One streaming chunk. Shapes in the module docstring; returns
        ``(log_probs, next_sub_cache, next_att_cache, next_conv_cache, next_lstm_h, next_lstm_c)``."""
        return self._run(x, sub_cache, att_cache, conv_cache, lstm_h, lstm_c, self.cfg.chunk)

    def initial_state(self, batch: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in initial_state(self.cfg, batch).items()}

    def forward_full(self, feats: torch.Tensor) -> torch.Tensor:
        """Whole utterances: feats float32 ``(B, T, 80)`` raw fbank, ``T`` a multiple of 4 (pad with
        :func:`pad_frames`); returns log-probs ``(B, T // 4, vocab)``. Identical to streaming the
        chunks from zero states."""
        st = self.initial_state(feats.shape[0])
        return self._run(feats, *st.values(), chunk=self.cfg.chunk)[0]


def initial_state(cfg: ASRConfig, batch: int) -> dict[str, np.ndarray]:
    """Zero states for ``batch`` streams (float32), keyed by input name."""
    return {"sub_cache": np.zeros((batch, SUB_CONTEXT, cfg.n_mels), np.float32),
            "att_cache": np.zeros((batch, cfg.n_layers, cfg.left_context, 2 * cfg.d_model), np.float32),
            "conv_cache": np.zeros((batch, cfg.n_layers, cfg.d_model, cfg.conv_kernel - 1), np.float32),
            "lstm_h": np.zeros((batch, cfg.lstm_hidden), np.float32),
            "lstm_c": np.zeros((batch, cfg.lstm_hidden), np.float32)}


STATE_NAMES = ["sub_cache", "att_cache", "conv_cache", "lstm_h", "lstm_c"]
OUTPUT_NAMES = ["log_probs"] + ["next_" + n for n in STATE_NAMES]


def input_specs(cfg: ASRConfig) -> list[TensorSpec]:
    st = initial_state(cfg, 1)
    return [TensorSpec("x", ("batch", cfg.chunk_frames, cfg.n_mels), "float32", -15.0, 5.0)] + \
        [TensorSpec(n, ("batch",) + st[n].shape[1:], "float32", -1.0, 1.0) for n in STATE_NAMES]


def pad_to(feats: np.ndarray, mean: np.ndarray, length: int) -> np.ndarray:
    """Pad ``(T, 80)`` frames at the end to ``length`` frames with ``mean`` (normalized zero); float32."""
    return np.concatenate([feats, np.broadcast_to(mean, (length - len(feats), feats.shape[1]))]).astype(np.float32)


def padded_length(frames: int, multiple: int) -> int:
    """``frames`` rounded up to a multiple of ``multiple``, at least one ``multiple`` (an empty
    utterance still runs one chunk)."""
    return max(1, math.ceil(frames / multiple)) * multiple


def pad_frames(feats: np.ndarray, mean: np.ndarray, multiple: int) -> np.ndarray:
    """Pad ``(T, 80)`` frames at the end to a multiple of ``multiple`` (:func:`padded_length`) with ``mean``."""
    n = padded_length(len(feats), multiple)
    return feats if n == len(feats) else pad_to(feats, mean, n)


def stream_batch(run, feats: list[np.ndarray], cfg: ASRConfig, mean: np.ndarray, batch: int = 256,
                 record: list | None = None) -> list[np.ndarray]:
    """Stream many utterances chunk by chunk through ``run(feeds) -> outputs`` (a deepship Session's
    ``run``), ``batch`` utterances side by side (their states stacked on axis 0).

    Args:
        feats: per utterance float32 ``(frames, 80)`` raw fbank.
        mean: the model's feature mean (pads the last chunk and shorter utterances).
        record: if a list, every chunk's feeds ``(utterance index, chunk index, {name: (1, ...)})`` are appended.

    Returns:
        per utterance, log-probs float32 ``(ceil(frames / 4), vocab)`` (encoder frames holding real audio).
    """
    n = cfg.chunk_frames
    out: list[np.ndarray] = [np.zeros((0, cfg.vocab), np.float32)] * len(feats)
    for b0 in range(0, len(feats), batch):
        idx = list(range(b0, min(b0 + batch, len(feats))))
        lens = [padded_length(len(feats[i]), n) for i in idx]
        chunks = max(lens) // n
        x = np.stack([pad_to(feats[i], mean, chunks * n) for i in idx])
        state = initial_state(cfg, len(idx))
        lps = []
        for c in range(chunks):
            feeds = {"x": np.ascontiguousarray(x[:, c * n:(c + 1) * n]), **state}
            if record is not None:
                for j, i in enumerate(idx):
                    if c * n < lens[j]:
                        record.append((i, c, {k: v[j:j + 1].copy() for k, v in feeds.items()}))
            res = run(feeds)
            lps.append(np.asarray(res["log_probs"]))
            state = {k: np.asarray(res["next_" + k]) for k in STATE_NAMES}
        lp = np.concatenate(lps, axis=1)
        for j, i in enumerate(idx):
            out[i] = lp[j, :math.ceil(len(feats[i]) / SUBSAMPLING)]  # frames holding real audio
    return out


def torch_run(model: nn.Module):
    """``run(feeds) -> outputs`` over the chunk-step ``model`` in torch (no grad), for :func:`stream_batch`:
    feeds and outputs are dicts of numpy arrays keyed by the graph's input and output names."""
    names = [t.name for t in input_specs(model.cfg)]

    @torch.no_grad()
    def run(feeds):
        out = model(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names))
        return {k: o.numpy() for k, o in zip(OUTPUT_NAMES, out)}

    return run
