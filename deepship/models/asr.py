"""Streaming speech recognizer for the edge: Conformer encoder + LSTM + CTC over characters.

Architecture (:class:`StreamingConformerCTC`), input 80-dim log-mel fbank at 100 frames/s:

1. global CMVN (training-set mean and std, buffers of the module);
2. convolutional subsampling x4 (two ``Conv2d(k=3, stride=2)``, no padding in time; the 3 frames it
   needs from the previous chunk are the ``sub_cache`` state) -> 25 frames/s, 40 ms per frame;
3. ``n_layers`` Conformer blocks (Gulati et al. 2020, "Conformer: Convolution-augmented Transformer
   for Speech Recognition"): half-step feed-forward, multi-head self-attention over the chunk and
   ``left_context`` cached frames (keys and values cached: ``att_cache``), a convolution module with a
   *causal* depthwise convolution (its last ``kernel - 1`` inputs cached: ``conv_cache``), a second
   half-step feed-forward, LayerNorm. No relative position encoding: the depthwise convolution
   carries order, which keeps the attention cache a plain K/V window;
4. one unidirectional LSTM layer (state ``lstm_h``, ``lstm_c``): after self-attention for sequential
   inertia and cheap, quantization-friendly recurrence, as the seed notes recommend for hearing aids;
5. a linear CTC head over :data:`~deepship.models.speech.VOCAB` (blank = 0; Graves et al. 2006).

One code path (:meth:`StreamingConformerCTC.forward`) runs a chunk with its states; the
whole-utterance forward used in training (:meth:`~StreamingConformerCTC.forward_full`) is the same
computation with zero initial states and a chunk attention mask, so a streamed utterance equals the
whole-utterance output up to float rounding (tested). Nothing looks past the current chunk: the
algorithmic latency is the chunk (40 ms by default) plus the fbank window overhang (15 ms).

The exported graph is the chunk step, every state an explicit input and output, batch-first, so a
server can stack streams into a batch:

| input | shape (float32) | output |
|---|---|---|
| ``x`` | ``(batch, 4 * chunk, 80)`` raw fbank frames | ``log_probs`` ``(batch, chunk, vocab)`` |
| ``sub_cache`` | ``(batch, 3, 80)`` | ``next_sub_cache`` |
| ``att_cache`` | ``(batch, n_layers, left_context, 2 * d_model)`` | ``next_att_cache`` |
| ``conv_cache`` | ``(batch, n_layers, d_model, kernel - 1)`` | ``next_conv_cache`` |
| ``lstm_h``, ``lstm_c`` | ``(batch, lstm_hidden)`` | ``next_lstm_h``, ``next_lstm_c`` |
"""
from __future__ import annotations

import functools
import json
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import speech as S
from .spec import ArchConfig, Dataset, Metric, ModelSpec, Split, TensorSpec
from .train import fp16_storage, round_to_storage

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


# ---- training ------------------------------------------------------------------------------------

def _spec_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """SpecAugment (Park et al. 2019): 2 frequency masks (<= 10 bins), 2 time masks (<= 20 frames),
    on normalized features (masked to 0 = the mean)."""
    x = x.clone()
    B, T, Fq = x.shape
    for b in range(B):
        for _ in range(2):
            w = int(rng.integers(0, 11))
            f0 = int(rng.integers(0, Fq - w + 1))
            x[b, :, f0:f0 + w] = 0
            w = int(rng.integers(0, min(21, max(T // 5, 1) + 1)))
            t0 = int(rng.integers(0, max(T - w, 0) + 1))
            x[b, t0:t0 + w] = 0
    return x


def train_asr(model: StreamingConformerCTC, ds: Any, recipe: dict) -> dict:
    """CTC training (``torch.nn.CTCLoss``, blank 0) with AdamW, warm-up + cosine LR, SpecAugment and
    length-bucketed batches on the synthesized corpus (:func:`deepship.models.speech.corpus`).

    ``ds`` is the speech corpus (``spec.train_data``); ``recipe["max_utterances"]`` limits it.
    Returns ``{"train_s", "final_loss", "epochs", "epoch_losses"}``.
    """
    from .train import seed_everything

    seed_everything(int(recipe.get("seed", 0)))
    rng = np.random.default_rng(int(recipe.get("seed", 0)))
    corpus = ds
    train = corpus.train
    n = int(recipe.get("max_utterances") or len(train))
    feats = train.feats[:n]
    labels = [S.encode_text(t) for t in train.texts[:n]]
    allf = np.concatenate(feats)
    mean, std = allf.mean(0), allf.std(0) + 1e-5
    model.mean.copy_(torch.from_numpy(mean))
    model.std.copy_(torch.from_numpy(std))
    bs = int(recipe["batch_size"])
    order = np.argsort([len(f) for f in feats])
    batches = [order[i:i + bs] for i in range(0, n, bs)]
    epochs = int(recipe["epochs"])
    opt = torch.optim.AdamW(model.parameters(), lr=float(recipe["lr"]), weight_decay=float(recipe.get("weight_decay", 1e-2)))
    total = epochs * len(batches)
    warm = max(1, int(0.05 * total))

    def lr_at(s: int) -> float:
        return s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    t0 = time.perf_counter()
    model.train()
    loss = torch.tensor(0.0)
    log = recipe.get("_log")
    epoch_losses = []
    for ep in range(epochs):
        tot = 0.0
        for bi in rng.permutation(len(batches)):
            idx = batches[bi]
            T = max(len(feats[i]) for i in idx)
            T += (-T) % SUBSAMPLING
            x = np.stack([pad_to(feats[i], mean, T) for i in idx])
            xt = torch.from_numpy(x)
            if recipe.get("spec_augment", True):
                xt = _spec_augment((xt - model.mean) / model.std, rng) * model.std + model.mean
            out_lens = torch.tensor([(len(feats[i]) + SUBSAMPLING - 1) // SUBSAMPLING for i in idx])
            ys = [torch.from_numpy(labels[i]) for i in idx]
            logp = model.forward_full(xt)  # (B, T/4, V)
            loss = ctc(logp.transpose(0, 1), torch.cat(ys), out_lens, torch.tensor([len(y) for y in ys]))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            tot += float(loss.detach())
        epoch_losses.append(round(tot / len(batches), 4))
        if log:
            log(f"epoch {ep + 1}/{epochs} loss {tot / len(batches):.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    round_to_storage(model)
    return {"train_s": time.perf_counter() - t0, "final_loss": float(loss.detach()), "epochs": epochs,
            "epoch_losses": epoch_losses}


RECIPE = {"arch": DEFAULT.to_dict(), "corpus": dict(S.DEFAULT_RECIPE), "epochs": 50, "lr": 3e-3, "batch_size": 32,
          "weight_decay": 1e-2, "seed": 0, "spec_augment": True}


def _build(arch: dict | None = None) -> StreamingConformerCTC:
    return StreamingConformerCTC(ASRConfig.from_dict({**DEFAULT.to_dict(), **(arch or {})}))


#: character error rate (fraction, shown in %); only the spec's ``evaluate`` (:func:`evaluate_cer`)
#: computes it, by streaming whole utterances: one batch of chunk outputs does not give it
CER = Metric("cer", False, None, unit="%", scale=100.0)


def asr_spec() -> ModelSpec:
    """The ``asr`` zoo entry: streaming Conformer + LSTM + CTC on synthesized speech (see the module docstring)."""
    cfg = DEFAULT
    return ModelSpec(
        name="asr", task="speech-recognition", build=_build, inputs=input_specs(cfg), output_names=OUTPUT_NAMES,
        metric=CER, data=lambda: chunk_dataset(cfg), recipe=dict(RECIPE), train=_train_spec,
        train_data=corpus, evaluate=lambda session: evaluate_cer(session)["cer"],
        description=f"streaming Conformer ({cfg.n_layers} blocks, d {cfg.d_model}) + LSTM + CTC, "
                    f"{cfg.chunk_ms:.0f} ms chunks, espeak-ng speech with noise",
        plan=_plan, measure=lambda ctx, v, sess: measure_streaming(ctx, v, sess),
        extra={"config": cfg.to_dict()},
    )


def _train_spec(model, ds, recipe):
    from .train import train_log

    return train_asr(model, ds, {**recipe, "_log": train_log("asr")})



def _plan(default_plan: list) -> list:
    """The recognizer's report rows: FP32 torch (baseline), FP32 ONNX, INT8 dynamic, INT8 static QDQ
    (per-channel, MinMax calibration on chunks recorded from real training utterances with their states)."""
    return [("fp32-onnx", "export", "onnx", {}, "fp32-torch"),
            ("int8-dynamic", "quantize", "int8-dynamic", {}, "fp32-onnx"),
            ("int8-static", "quantize", "int8-static", {"calibration": "minmax", "per_channel": True}, "fp32-onnx")]


# ---- streaming over a session: evaluation, recording, measurements ----------------------------------

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


def greedy_text(log_probs: np.ndarray) -> str:
    """Greedy CTC transcript of ``(frames, vocab)`` log-probs."""
    from ..runtimes.asr_stream import ctc_greedy

    return S.decode_labels(ctc_greedy(log_probs)[0]).strip()


def error_rates(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus CER and WER (``jiwer``), fractions."""
    import jiwer

    return {"cer": float(jiwer.cer(refs, hyps)), "wer": float(jiwer.wer(refs, hyps))}


@functools.lru_cache(maxsize=1)
def trained() -> StreamingConformerCTC:
    """The trained ``asr`` module (committed weights, cache, or a training run), eval mode."""
    from .train import trained_model

    return trained_model(asr_spec())[0]


def feature_mean() -> np.ndarray:
    """float32 ``(80,)``: the training-set fbank mean stored in the trained model (pads chunks)."""
    return trained().mean.numpy().astype(np.float32)


def feature_config(cfg: ASRConfig = DEFAULT) -> dict:
    """The ``features.json`` of the streaming runner (:class:`deepship.runtimes.asr_stream.FeatureConfig`)."""
    st = initial_state(cfg, 1)
    return {"sample_rate": S.SAMPLE_RATE, "n_mels": cfg.n_mels, "frame_length_ms": S.FRAME_LENGTH_MS,
            "frame_shift_ms": S.FRAME_SHIFT_MS, "chunk_frames": cfg.chunk_frames,
            "chunk_ms": cfg.chunk_ms, "algorithmic_latency_ms": cfg.algorithmic_latency_ms,
            "mean": [round(float(v), 6) for v in feature_mean()],
            "state_shapes": {k: list(v.shape[1:]) for k, v in st.items()}, "tokens": S.VOCAB,
            "blank": 0, "library": "kaldi-native-fbank OnlineFbank, snip_edges false, dither 0"}


@functools.lru_cache(maxsize=1)
def corpus() -> "S.SpeechCorpus":
    """The recipe's speech corpus, read from its cache once per process (the report's evaluation,
    measurements and calibration all use it)."""
    return S.corpus(RECIPE["corpus"])


#: per session, its :func:`evaluate_cer` results: the report's metric, its measurements and the bundle
#: all ask for the same streaming evaluation of the same session
_EVALUATED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def stream_config():
    """The :class:`deepship.runtimes.asr_stream.FeatureConfig` of the trained model (for a ``Stream``)."""
    from ..runtimes.asr_stream import FeatureConfig

    return FeatureConfig(feature_config())


def evaluate_cer(session, noisy: bool = False, limit: int | None = None) -> dict[str, float]:
    """CER and WER (fractions) of greedy CTC over the held-out voices and sentences, streamed chunk by
    chunk through ``session`` (clean, or at 10 dB SNR with ``noisy``). Computed once per session."""
    memo = _EVALUATED.setdefault(session, {})
    if (noisy, limit) not in memo:
        c = corpus()
        part = c.test_noisy if noisy else c.test
        n = len(part) if limit is None else min(limit, len(part))
        lps = stream_batch(session.run, part.feats[:n], DEFAULT, feature_mean())
        memo[(noisy, limit)] = error_rates([greedy_text(lp) for lp in lps], part.texts[:n])
    return dict(memo[(noisy, limit)])


def _record(part: "S.SpeechSet", n_utts: int, n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(part))[:n_utts])
    rec: list = []
    from ..runtimes.session import TorchSession

    sess = TorchSession(trained(), input_names=[t.name for t in input_specs(DEFAULT)], output_names=OUTPUT_NAMES)
    stream_batch(sess.run, [part.feats[i] for i in idx], DEFAULT, feature_mean(), record=rec)
    pick = np.sort(rng.permutation(len(rec))[:n])
    return Split({k: np.concatenate([rec[i][2][k] for i in pick]) for k in rec[0][2]}, None)


def chunk_dataset(cfg: ASRConfig = DEFAULT) -> Dataset:
    """Real streaming chunks with their states, recorded by streaming utterances through the trained
    FP32 model: 256 from training utterances (INT8 calibration) and 128 from held-out ones (the
    report's drift and per-chunk latency inputs). The metric itself streams whole utterances
    (:func:`evaluate_cer`)."""
    c = corpus()
    return Dataset(_record(c.train, 64, 256, 0), _record(c.test, 32, 128, 1),
                   source=f"espeak-ng speech: {len(c.train)} training utterances ({c.train.seconds.sum() / 3600:.1f} h), "
                          f"{len(c.test)} held-out (unseen voices and sentences)")


#: held-out utterances streamed for the real-time factor and per-chunk latency (about 45 s of audio)
RTF_UTTERANCES = 20


def measure_streaming(ctx: Any, variant: Any, session: Any, utterances: int = RTF_UTTERANCES) -> dict:
    """The report's ASR columns for one variant (``ctx``: the ``asr`` ModelContext; ``session``: the
    variant's session).

    - ``wer`` and ``cer_noisy`` (10 dB SNR) over the held-out set (fractions);
    - ``rtf_1thread``: compute time / audio time when streaming ``utterances`` held-out utterances in
      40 ms pieces through a fresh 1-thread session, fbank included (:class:`Stream`);
    - ``chunk_ms_p50``, ``chunk_ms_p99``: model compute per chunk (ms) in that run;
    - ``algorithmic_latency_ms``: chunk + fbank window overhang (no lookahead);
    - ``peak_rss_mb``: peak resident memory of a fresh runner process (the bundle's ``asr_stream.py``:
      onnxruntime + numpy + kaldi-native-fbank) transcribing one utterance (ONNX variants only).
    """
    from ..runtimes.asr_stream import Stream

    out: dict[str, Any] = {}
    er = evaluate_cer(session)
    out["wer"] = round(er["wer"], 4)
    out["cer_noisy"] = round(evaluate_cer(session, noisy=True)["cer"], 4)
    c = corpus()
    fc = stream_config()
    prev_threads = torch.get_num_threads()
    one = ctx.session(variant, threads=1)
    piece = S.SAMPLE_RATE * 40 // 1000
    total, audio, lat = 0.0, 0.0, []
    for a in c.test_audio[:utterances]:
        st = Stream(one, fc)
        t0 = time.perf_counter()
        for i in range(0, len(a), piece):
            st.accept_waveform(a[i:i + piece], S.SAMPLE_RATE)
        st.finalize()
        total += time.perf_counter() - t0
        audio += len(a) / S.SAMPLE_RATE
        lat += st.chunk_latencies_ms
    torch.set_num_threads(prev_threads)  # a 1-thread torch session sets the process-wide count
    out.update(rtf_1thread=round(total / audio, 4), chunk_ms_p50=round(float(np.percentile(lat, 50)), 3),
               chunk_ms_p99=round(float(np.percentile(lat, 99)), 3), chunks=len(lat),
               algorithmic_latency_ms=DEFAULT.algorithmic_latency_ms)
    if variant.format == "onnx":
        out["peak_rss_mb"] = runner_peak_rss_mb(variant.path, c.test_audio[0])
    return out


def runner_peak_rss_mb(model_path: str, audio: np.ndarray) -> float | None:
    """Peak RSS (MiB, ``VmHWM``) of the bundle runner (``asr_stream.py MODEL features.json utt.wav``)
    in a fresh Python process. ``VmHWM`` is read inside that process at the end: the child's
    ``ru_maxrss`` would also count the parent's pages it shared between fork and exec."""
    import subprocess
    import sys
    import tempfile
    import wave
    from pathlib import Path

    from ..runtimes import asr_stream

    with tempfile.TemporaryDirectory() as td:
        wav = Path(td) / "utt.wav"
        with wave.open(str(wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(S.SAMPLE_RATE)
            w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
        feats = Path(td) / "features.json"
        feats.write_text(json.dumps(feature_config()))
        code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
                "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)")
        p = subprocess.run([sys.executable, "-c", code, asr_stream.__file__, str(model_path), str(feats), str(wav)],
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0 or not p.stderr.strip():
            return None
        return round(int(p.stderr.strip().splitlines()[-1]) / 1024, 1)  # VmHWM is in kB
