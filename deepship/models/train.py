"""Seeded training loops for the zoo (small enough for 2 CPU cores) and the trained-weights cache.

Trained weights are stored as safetensors (library: ``safetensors``) with the recipe in the file's
metadata. Lookup order: weights committed in ``deepship/models/weights/`` whose recipe matches,
then the local cache (``$DEEPSHIP_CACHE/weights``), else the recipe runs and its result is cached.
Reproduce the committed files with ``optimize train --all --out deepship/models/weights``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from ..errors import WeightsError
from ..utils import atomic_file, cache_root, first_line, stable_hash

if TYPE_CHECKING:
    from .spec import Dataset, ModelSpec

PACKAGED_WEIGHTS = Path(__file__).parent / "weights"


def eval_mode(model):
    """``model.eval()``, tolerating modules that refuse it (a ``torch.export`` program's module is
    always in the mode it was exported in)."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def fp16_storage(module, state_dict, prefix, local_metadata):
    """``state_dict`` post-hook (``module.register_state_dict_post_hook(fp16_storage)``): floating
    tensors are saved as float16, which halves the committed weights; pair with :func:`round_to_storage`
    at the end of training so the file holds the trained model exactly."""
    for k, v in state_dict.items():
        if k.startswith(prefix) and v.is_floating_point():
            state_dict[k] = v.detach().to(torch.float16)


def round_to_storage(model: nn.Module) -> nn.Module:
    """Round every floating parameter and buffer to float16 and back (see :func:`fp16_storage`)."""
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(t.half().float())
    return model


def train_log(name: str):
    """A ``print``-like progress logger for long training loops (to stderr), or ``None`` unless the
    environment variable ``DEEPSHIP_TRAIN_LOG`` is set."""
    import os
    import sys

    if not os.environ.get("DEEPSHIP_TRAIN_LOG"):
        return None
    return lambda s: print(f"{name}: {s}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(n: int, bs: int, rng: np.random.Generator):
    idx = rng.permutation(n)
    for i in range(0, n, bs):
        yield idx[i:i + bs]


def train_classifier(model: nn.Module, ds: "Dataset", recipe: dict) -> dict:
    """Cross-entropy training with AdamW and cosine LR decay; returns ``{"train_s", "final_loss"}``."""
    return _train(model, ds, recipe, lambda out, y: nn.functional.cross_entropy(out, y), torch.long)


def train_regressor(model: nn.Module, ds: "Dataset", recipe: dict) -> dict:
    """MSE (or L1 with ``recipe["loss"] == "l1"``) training on the model's own scale.

    Loss is computed on targets divided by the model's ``std`` buffer when it has one, so that the
    learning rate does not depend on the data's units.
    """
    scale = float(getattr(model, "std", torch.tensor(1.0)))
    lossf = nn.functional.l1_loss if recipe.get("loss") == "l1" else nn.functional.mse_loss
    return _train(model, ds, recipe, lambda out, y: lossf(out / scale, y / scale), torch.float32)


def _train(model: nn.Module, ds: "Dataset", recipe: dict, loss_fn, ydtype) -> dict:
    seed_everything(int(recipe.get("seed", 0)))
    rng = np.random.default_rng(int(recipe.get("seed", 0)))
    name = next(iter(ds.train.inputs))
    x = torch.from_numpy(ds.train.inputs[name])
    y = torch.from_numpy(ds.train.targets).to(ydtype)
    epochs = int(recipe["epochs"])
    opt = torch.optim.AdamW(model.parameters(), lr=float(recipe["lr"]), weight_decay=float(recipe.get("weight_decay", 0)))
    steps = epochs * ((len(x) + recipe["batch_size"] - 1) // recipe["batch_size"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    t0 = time.perf_counter()
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for b in _batches(len(x), int(recipe["batch_size"]), rng):
            bi = torch.from_numpy(b)
            opt.zero_grad()
            loss = loss_fn(model(x[bi]), y[bi])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    return {"train_s": time.perf_counter() - t0, "final_loss": float(loss.detach())}


#: the generic supervised recipe a user model gets with ``--train-data`` (:func:`fit_supervised`)
USER_RECIPE = {"epochs": 30, "lr": 2e-3, "batch_size": 64, "weight_decay": 1e-4, "seed": 0, "val_fraction": 0.1,
               "patience": 5}


def fit_supervised(model: nn.Module, ds: "Dataset", recipe: dict) -> dict:
    """Generic supervised training for a user's classifier or regressor on ``ds.train``.

    Cross-entropy for integer targets (class ids, logits ``(batch, classes)``), MSE for float targets;
    AdamW (``lr``, ``weight_decay``) with cosine decay over ``epochs`` of ``batch_size`` samples,
    gradient clipping at 1.0; early stopping on a seeded ``val_fraction`` of the training samples
    (patience ``patience`` epochs), keeping the weights of the best validation loss. Seeded.

    Returns:
        ``{"train_s", "final_loss", "epochs_run", "best_val_loss", "stopped_early"}`` (seconds, losses).

    Raises:
        WeightsError: ``ds.train`` has no targets.
    """
    import copy

    if ds is None or ds.train.targets is None:
        raise WeightsError("training needs labeled samples; pass --train-data FILE.npz with 'targets'")
    seed_everything(int(recipe.get("seed", 0)))
    rng = np.random.default_rng(int(recipe.get("seed", 0)))
    names = list(ds.train.inputs)
    xs = [torch.from_numpy(np.ascontiguousarray(ds.train.inputs[n])) for n in names]
    y_np = np.asarray(ds.train.targets)
    classify = np.issubdtype(y_np.dtype, np.integer)
    y = torch.from_numpy(y_np.astype(np.int64) if classify else y_np.astype(np.float32))
    n = len(y)
    perm = rng.permutation(n)
    n_val = int(round(n * float(recipe.get("val_fraction", 0.1)))) if n >= 20 else 0
    val, tr = perm[:n_val], perm[n_val:]

    def loss_of(idx) -> torch.Tensor:
        out = model(*(x[idx] for x in xs))
        out = out[0] if isinstance(out, (tuple, list)) else out
        if classify:
            return nn.functional.cross_entropy(out.reshape(len(idx), -1), y[idx].reshape(-1))
        return nn.functional.mse_loss(out.reshape(len(idx), -1), y[idx].reshape(len(idx), -1).to(out.dtype))

    epochs, bs = int(recipe["epochs"]), int(recipe.get("batch_size", 64))
    opt = torch.optim.AdamW(model.parameters(), lr=float(recipe["lr"]), weight_decay=float(recipe.get("weight_decay", 0)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * ((len(tr) + bs - 1) // bs)))
    best, best_state, bad, ran = float("inf"), None, 0, 0
    t0 = time.perf_counter()
    loss = torch.tensor(0.0)
    for ep in range(epochs):
        model.train()
        for b in _batches(len(tr), bs, rng):
            opt.zero_grad()
            loss = loss_of(torch.from_numpy(tr[b]))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        ran = ep + 1
        if n_val:
            model.eval()
            with torch.no_grad():
                v = float(loss_of(torch.from_numpy(val)))
            if v < best - 1e-6:
                best, best_state, bad = v, copy.deepcopy(model.state_dict()), 0
            else:
                bad += 1
                if bad >= int(recipe.get("patience", 5)):
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"train_s": time.perf_counter() - t0, "final_loss": float(loss.detach()), "epochs_run": ran,
            "best_val_loss": best if n_val else None, "stopped_early": ran < epochs}


def recipe_hash(spec: "ModelSpec | str", recipe: dict | None = None) -> str:
    """Hash of a zoo model's name and recipe (architecture + hyper-parameters) that keys its cached and
    committed weights; ``spec`` is a :class:`ModelSpec` (its own recipe unless ``recipe`` is given) or
    a zoo name with ``recipe``."""
    name = spec if isinstance(spec, str) else spec.name
    if recipe is None and not isinstance(spec, str):
        recipe = spec.recipe
    return stable_hash({"model": name, "recipe": recipe, "v": 1})


def build_model(spec: "ModelSpec", recipe: dict | None = None) -> nn.Module:
    """Build the untrained module for ``spec`` with ``recipe["arch"]`` applied."""
    recipe = recipe if recipe is not None else (spec.recipe or {})
    try:
        m = spec.build(recipe.get("arch")) if recipe.get("arch") is not None else spec.build()
    except TypeError:
        m = spec.build()
    return m


def train_model(spec: "ModelSpec", recipe: dict | None = None) -> tuple[nn.Module, dict]:
    """Run ``spec``'s seeded recipe (or ``recipe``) from scratch; returns ``(eval-mode module, stats)``."""
    recipe = recipe if recipe is not None else spec.recipe
    if recipe is None or spec.train is None or spec.data is None:
        raise WeightsError(f"model '{spec.name}' has no training recipe; pass --weights")
    seed_everything(int(recipe.get("seed", 0)))
    model = build_model(spec, recipe)
    stats = spec.train(model, (spec.train_data or spec.data)(), recipe)
    return model.eval(), stats


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save a module's state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_file(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=metadata or {})
    return path


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load safetensors, or a torch checkpoint with ``weights_only=True`` (never unpickles code).

    Raises:
        WeightsError: the file is missing, corrupt, or its tensors do not fit the module.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; check the path given to --weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
    except Exception as e:  # corrupt file: safetensors/torch raise many types
        raise WeightsError(f"cannot read weights {path}: {type(e).__name__}: {first_line(e, 120)}; "
                           "give a safetensors file or a torch state_dict checkpoint") from None
    if not isinstance(state, dict):
        raise WeightsError(f"weights {path} hold a {type(state).__name__}, not a state_dict; save model.state_dict()")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2] or [str(e)[:200]]
        raise WeightsError(f"weights {path} do not fit the model: {first[0][:200]}") from None
    return eval_mode(model)


def _metadata_matches(path: Path, h: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("recipe_hash") == h
    except Exception:
        return False


def trained_model(spec: "ModelSpec", retrain: bool = False, progress=None) -> tuple[nn.Module, dict]:
    """The trained module for a zoo spec, from committed weights, the cache, or a fresh training run.

    Returns:
        ``(module in eval mode, info)`` where info has ``{"weights": path, "origin": "packaged"|"cache"|"trained", ...}``.
    """
    h = recipe_hash(spec)
    packaged = PACKAGED_WEIGHTS / f"{spec.name}.safetensors"
    cached = cache_root() / "weights" / f"{spec.name}-{h}.safetensors"
    for path, origin in ((packaged, "packaged"), (cached, "cache")):
        if not retrain and path.is_file() and _metadata_matches(path, h):
            return load_weights(build_model(spec), path), {"weights": str(path), "origin": origin, "recipe_hash": h}
    if progress:
        progress(f"training {spec.name} (seeded recipe, cached afterwards)")
    model, stats = train_model(spec)
    save_weights(model, cached, {"recipe_hash": h, "recipe": json.dumps(spec.recipe), "train_s": f"{stats['train_s']:.1f}"})
    return model, {"weights": str(cached), "origin": "trained", "recipe_hash": h, **stats}
