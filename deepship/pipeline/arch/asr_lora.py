"""ASR personalization: LoRA on the streaming recognizer for one voice (a hearing aid learns its wearer).

The wearer's recordings (a TSV of ``audio path<TAB>transcript``, a few minutes) train LoRA adapters
(Hu et al. 2021, Hugging Face PEFT, through :mod:`deepship.pipeline.finetune`) on the recognizer's attention (``qkv``, ``proj``) and convolution
module (``pw1``, ``pw2``) linear layers with CTC loss and SpecAugment; the base stays frozen. The
adapter (PEFT's format, as :func:`deepship.pipeline.finetune.save_adapter` writes it) is what a device
downloads; merged, it is an ordinary recognizer that exports to the same streaming graph.

Measured (:func:`adapt_recognizer`): CER of the wearer's held-out recordings before and after, and of the
corpus's held-out sentences by other voices (no regression), adapter bytes, training time.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ...errors import DataError, InputSpecError
from ..finetune import LoraOptions, _fit, lora_model, merge, options_dict, save_adapter

#: the recognizer's linear layers adapted by default: self-attention and the convolution module's
#: pointwise layers in every Conformer block (rank 4: 22.5 k parameters, about 90 KB in FP32)
ASR_TARGETS = ("qkv", "proj", "pw1", "pw2")


def read_clips(tsv: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """Audio clips and transcripts listed in ``tsv`` (``path<TAB>text`` per line, paths relative to the
    TSV's folder; any rate, mono or stereo, resampled to 16 kHz).

    Raises:
        DataError: a missing or empty TSV, a line without a transcript, an unreadable clip.
    """
    from ...models.asr import data as S
    from ...models.asr.text import normalize

    p = Path(tsv)
    if not p.is_file():
        raise DataError(f"clips file {p} not found; give a TSV of 'audio path<TAB>transcript' lines")
    audio, texts = [], []
    with open(p, encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2 or not normalize(row[1]):
                raise DataError(f"{p} line {i} has no transcript; write 'audio path<TAB>what is said'")
            audio.append(S.load_audio(p.parent / row[0].strip()))
            texts.append(normalize(row[1]))
    if not audio:
        raise DataError(f"{p} lists no clips; write one 'audio path<TAB>transcript' line per recording")
    return audio, texts


def _cer(model: nn.Module, feats: list[np.ndarray], texts: list[str]) -> float:
    from ...models.asr import DEFAULT, feature_mean, stream_batch, torch_run
    from .asr import error_rates, greedy_text

    lps = stream_batch(torch_run(model), feats, DEFAULT, feature_mean())
    return error_rates([greedy_text(lp) for lp in lps], texts)["cer"]


def adapt_recognizer(ctx: Any, train_tsv: str | Path, opts: LoraOptions, out_dir: str | Path,
                     eval_tsv: str | Path | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """LoRA on the ``asr`` recognizer for the voice of ``train_tsv``'s clips; writes ``out_dir/adapter/``
    (PEFT format + ``deepship.json``) and ``out_dir/finetune.json``, and returns the summary:
    ``train`` (seconds, steps, trainable share), ``train_audio_s``, ``adapter_bytes``, and CER (fractions)
    before/after on ``eval_tsv``'s clips (the same voice, other sentences) and on the corpus's held-out
    sentences by other voices (``others``); ``merged_max_abs_diff``: merged vs unmerged log-probs.

    Raises:
        InputSpecError: not the ASR model, or bad options (:meth:`LoraOptions.check`).
        DataError: unreadable clips (:func:`read_clips`).
    """
    from ...models.asr import SUBSAMPLING, corpus
    from ...models.asr import data as S
    from ...models.asr.model import pad_to
    from ...models.asr.train import spec_augment
    from ...utils import write_json_atomic

    if ctx.spec.family != "asr":
        raise InputSpecError(f"{ctx.spec.name} is not a speech recognizer; the clips adapt the asr model")
    base = ctx.module()
    opts.check(base)
    audio, texts = read_clips(train_tsv)
    ev_audio, ev_texts = read_clips(eval_tsv) if eval_tsv else ([], [])
    feats = [S.fbank(a) for a in audio]
    ev_feats = [S.fbank(a) for a in ev_audio]
    labels = [torch.from_numpy(S.encode_text(t)) for t in texts]
    others = corpus().test
    before = {"voice": _cer(base, ev_feats, ev_texts) if ev_feats else None, "others": _cer(base, others.feats, others.texts)}
    model = lora_model(base, opts)
    inner = model.get_base_model()
    mean = inner.mean.numpy()
    rng = np.random.default_rng(int(opts.seed))
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)

    def loss() -> torch.Tensor:
        idx = rng.choice(len(feats), size=min(int(opts.batch_size), len(feats)), replace=False)
        T = max(len(feats[i]) for i in idx)
        T += (-T) % SUBSAMPLING
        x = torch.from_numpy(np.stack([pad_to(feats[i], mean, T) for i in idx]))
        x = spec_augment((x - inner.mean) / inner.std, rng) * inner.std + inner.mean
        out_lens = torch.tensor([(len(feats[i]) + SUBSAMPLING - 1) // SUBSAMPLING for i in idx])
        ys = [labels[i] for i in idx]
        logp = inner.forward_full(x)
        return ctc(logp.transpose(0, 1), torch.cat(ys), out_lens, torch.tensor([len(y) for y in ys]))

    t0 = time.perf_counter()
    stats = _fit(model, opts, loss, progress)
    after = {"voice": _cer(inner, ev_feats, ev_texts) if ev_feats else None, "others": _cer(inner, others.feats, others.texts)}
    meta = {"model": ctx.spec.name, "clips": str(train_tsv), "options": options_dict(opts), "train": stats,
            "before": before, "after": after}
    out_dir = Path(out_dir)
    adapter = save_adapter(model, out_dir / "adapter", meta)
    merged = merge(model)
    x = torch.from_numpy(pad_to(feats[0], mean, len(feats[0]) + (-len(feats[0])) % SUBSAMPLING)[None])
    with torch.no_grad():
        diff = float((merged.forward_full(x) - inner.forward_full(x)).abs().max())
    res = {**meta, "train_audio_s": round(sum(len(a) for a in audio) / S.SAMPLE_RATE, 1), "clips_n": len(audio),
           "eval_clips_n": len(ev_audio), "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
           "merged_max_abs_diff": diff, "wall_s": round(time.perf_counter() - t0, 1)}
    if before["voice"]:
        res["voice_cer_reduction"] = 1 - after["voice"] / before["voice"]
    res["others_cer_change_pt"] = (after["others"] - before["others"]) * 100
    write_json_atomic(out_dir / "finetune.json", res)
    return res
