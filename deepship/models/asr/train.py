"""The recognizer's seeded training recipe: CTC with SpecAugment on the synthesized corpus."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..train import PACKAGED_WEIGHTS, load_weights, round_to_storage, seed_everything
from . import data as S
from .model import DEFAULT, SUBSAMPLING, StreamingConformerCTC, pad_to


def spec_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
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
    """CTC training (``torch.nn.CTCLoss``, blank 0) with AdamW, warm-up + cosine LR, SpecAugment,
    length-bucketed batches and SortaGrad (``recipe["sortagrad_epochs"]`` epochs shortest first) on the synthesized corpus (:func:`deepship.models.asr.data.corpus`).

    ``ds`` is the speech corpus (``spec.train_data``); ``recipe["max_utterances"]`` limits it;
    ``recipe["init"]`` names committed weights to start from (the CMVN statistics are recomputed).
    Returns ``{"train_s", "final_loss", "epochs", "epoch_losses"}``.
    """
    seed_everything(int(recipe.get("seed", 0)))
    rng = np.random.default_rng(int(recipe.get("seed", 0)))
    corpus = ds
    train = corpus.train
    n = int(recipe.get("max_utterances") or len(train))
    feats = train.feats[:n]
    labels = [S.encode_text(t) for t in train.texts[:n]]
    if recipe.get("init"):
        # warm start: the template recognizer (its own seeded recipe at commit 7b87bf8, weights committed as
        # deepship/models/weights/<init>.safetensors) has learned to align espeak-ng speech; from scratch
        # the open-vocabulary corpus held CTC on its all-blank plateau (loss 3.11 after 8 epochs)
        load_weights(model, PACKAGED_WEIGHTS / f"{recipe['init']}.safetensors")
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
        # SortaGrad (Amodei et al. 2016, Deep Speech 2): the first epochs run the batches shortest first,
        # which gets CTC off its all-blank plateau on mixed-length data; then in random order
        order_b = np.arange(len(batches)) if ep < int(recipe.get("sortagrad_epochs", 0)) else rng.permutation(len(batches))
        for bi in order_b:
            idx = batches[bi]
            T = max(len(feats[i]) for i in idx)
            T += (-T) % SUBSAMPLING
            x = np.stack([pad_to(feats[i], mean, T) for i in idx])
            xt = torch.from_numpy(x)
            if recipe.get("spec_augment", True):
                xt = spec_augment((xt - model.mean) / model.std, rng) * model.std + model.mean
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


#: the seeded recipe of the committed weights (``speech_version``: the corpus code's version, so a
#: changed corpus changes the recipe hash and retrains)
RECIPE = {"arch": DEFAULT.to_dict(), "corpus": dict(S.DEFAULT_RECIPE), "speech_version": S.SPEECH_VERSION, "epochs": 30,
          "init": "asr-templates", "sortagrad_epochs": 0, "lr": 1e-3, "batch_size": 32, "weight_decay": 1e-2, "seed": 0, "spec_augment": True}
