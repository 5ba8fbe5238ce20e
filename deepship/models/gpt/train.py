"""The GPT's seeded training recipes: next-token training of the target, and the draft distilled from
it (token-level KD on the training text plus target-written continuations)."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import token_kd_loss
from ..spec import Dataset
from ..train import recipe_hash, round_to_storage, seed_everything, train_log
from .data import corpus, tokenizer_hash
from .model import DRAFT, GPT, TARGET, GPTConfig, continue_tokens

# ---- training -----------------------------------------------------------------------------------

TARGET_RECIPE = {
    "arch": TARGET.to_dict(), "tokenizer": tokenizer_hash(), "steps": 2000, "batch_size": 2,
    "seq_len": TARGET.context, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup": 100, "weight_decay": 0.1,
    "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "threads": 2,
}


def draft_recipe() -> dict:
    """The draft's seeded recipe (keyed by the target's recipe hash: a retrained target retrains the draft)."""
    return {"arch": DRAFT.to_dict(), "tokenizer": tokenizer_hash(), "teacher": recipe_hash("gpt", TARGET_RECIPE),
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
    rng = np.random.default_rng(int(pool["seed"]))
    train = corpus()[0]
    n, plen, bs = int(pool["sequences"]), int(pool["prompt_tokens"]), int(pool["batch"])
    starts = rng.integers(0, len(train) - plen, size=n)
    prompts = np.stack([train[s:s + plen] for s in starts])
    prev = torch.get_num_threads()
    torch.set_num_threads(int(pool.get("threads", prev)))
    teacher.eval()
    n_greedy = int(round(n * float(pool["greedy_fraction"])))
    new = cfg.context + 1 - plen  # prompt + continuation = context + 1 tokens: one training window
    out = []
    for i in range(0, n, bs):
        chunk = prompts[i:i + bs]
        temperature = None if i < n_greedy else float(pool["temperature"])
        cont = continue_tokens(teacher, chunk, new, temperature, seed=int(pool["seed"]) + i)
        out.append(np.concatenate([chunk, cont], 1))
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
    :func:`deepship.models.losses.token_kd_loss` at ``kd_temperature`` with weight ``kd_alpha`` on
    the labels. AdamW (decoupled weight decay on matrices only), linear warm-up, cosine decay to
    ``min_lr_ratio * lr``, gradient clipping. Weights are rounded to float16 at the end.

    Returns:
        ``{"train_s", "final_loss", "tokens_seen"}`` (seconds, nats per token, tokens).
    """
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


def train_target(model: GPT, ds: Dataset | None, recipe: dict) -> dict:
    """The ``gpt`` recipe's training function (:func:`train_gpt`, progress to ``DEEPSHIP_TRAIN_LOG``)."""
    return train_gpt(model, ds, recipe, progress=train_log("gpt"))


def train_draft(model: GPT, ds: Dataset | None, recipe: dict, teacher: nn.Module) -> dict:
    """The ``gpt-draft`` recipe: the pool of ``teacher``-written continuations, then :func:`train_gpt`
    with token-level KD from ``teacher`` (the trained ``gpt``)."""
    log = train_log("gpt-draft")
    t0 = time.perf_counter()
    pool = target_continuations(teacher, TARGET, recipe["pool"]) if recipe.get("pool") else None
    if log and pool is not None:
        log(f"{len(pool)} target continuations generated in {time.perf_counter() - t0:.0f} s")
    stats = train_gpt(model, ds, recipe, teacher=teacher, progress=log, pool=pool)
    stats["train_s"] = time.perf_counter() - t0  # generation of the pool included
    return stats


