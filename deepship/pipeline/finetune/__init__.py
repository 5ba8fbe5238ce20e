"""LoRA and QLoRA: adapt a trained decoder to new text on a frozen (or 4-bit) base, save the adapter, merge.

Methods and libraries:

- LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): Hugging Face PEFT's
  ``LoraConfig`` + ``get_peft_model`` wrap the chosen ``nn.Linear`` layers with trainable rank-``r``
  ``A``/``B`` matrices scaled by ``alpha / r``; the base stays frozen in FP32.
- QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): the base's target
  linear weights are first stored as 4-bit NormalFloat (NF4) with double quantization (the absmax
  scales quantized again), by bitsandbytes' ``Linear4bit`` (its CPU backend runs here); PEFT
  dispatches LoRA onto those layers natively. Adapters train in FP32.
- Adapters are saved in PEFT's own format (``adapter_config.json`` + ``adapter_model.safetensors``),
  so ``peft.PeftModel.from_pretrained(base, folder)`` loads them.
- Merging folds ``B @ A * alpha / r`` into the base weights (PEFT's ``merge_and_unload``). For QLoRA
  the base is de-quantized to FP32 first and the adapter merged into that (the standard path: merging
  into the 4-bit weights would re-quantize the sum).

Only modules built of ``nn.Linear`` layers are adapted (the zoo's GPT: ``qkv``, ``proj``, ``fc``,
``out`` in every block). Training samples random windows of a token stream; the loss is next-token
cross-entropy, AdamW, constant learning rate after a linear warm-up.
"""
from __future__ import annotations

import copy
import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import InputSpecError
from ...utils import atomic_dir
from ..stages import register_stage

#: the GPT's linear layers adapted by default (``out`` too would be 3.6% trainable at rank 4; these are 2.4%)
DEFAULT_TARGETS = ("qkv", "proj", "fc")


@dataclass
class LoraOptions:
    """What a LoRA/QLoRA run does.

    Attributes:
        rank: LoRA rank ``r`` (> 0). alpha: the scale numerator (``alpha / r`` multiplies ``B @ A``).
        targets: names (the last part of the module path) of the ``nn.Linear`` layers to adapt.
        qlora: store every linear weight of the base in NF4 with double quantization (bitsandbytes).
        steps, lr, batch_size, seq_len, warmup, seed: the training loop (optimizer steps, AdamW
            learning rate, windows per step, tokens per window, warm-up steps, RNG seed).
        dropout: LoRA dropout on the adapter input. threads: torch intra-op threads while training.
    """

    rank: int = 4
    alpha: float = 8.0
    targets: Sequence[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    qlora: bool = False
    steps: int = 300
    lr: float = 2e-3
    batch_size: int = 4
    seq_len: int = 128
    warmup: int = 20
    seed: int = 0
    dropout: float = 0.0
    threads: int | None = None

    def check(self, model: nn.Module) -> None:
        """Refuse options that cannot run on ``model``.

        Raises:
            InputSpecError: rank, alpha, steps, lr, batch size or sequence length not positive; a target
                that names no ``nn.Linear`` of the model; a model that already carries LoRA layers.
        """
        for name in ("rank", "alpha", "steps", "lr", "batch_size", "seq_len"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InputSpecError(f"--{name.replace('_', '-')} must be > 0 (got {v}); pass a positive number")
        if any(".lora_" in n or n.startswith("lora_") for n, _ in model.named_modules()):
            raise InputSpecError("the model already carries LoRA layers (an adapted or unmerged model); "
                                 "adapt the base model, or merge first")
        have = linear_names(model)
        missing = [t for t in self.targets if t not in have]
        if not self.targets or missing:
            raise InputSpecError(f"target module(s) {', '.join(missing) or '(none)'} not in the model; "
                                 f"its linear layers are: {', '.join(sorted(have))}")


def linear_names(model: nn.Module) -> set[str]:
    """Last path components of the model's ``nn.Linear`` layers (what ``--targets`` names)."""
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy without state-dict hooks (the zoo's FP16-storage hook would round saved adapters)."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        mod._state_dict_hooks.clear()
    return m


def quantize_nf4(model: nn.Module, targets: Sequence[str] | None = None) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` (all, as QLoRA does, or those named in ``targets``)
    in place by bitsandbytes ``Linear4bit``: NF4 weights with double quantization
    (``compress_statistics=True``), FP32 compute, biases FP32. Embeddings stay FP32.

    Returns:
        the model. Raises ``ImportError`` (with the install line) without bitsandbytes.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise ImportError("QLoRA needs bitsandbytes; pip install bitsandbytes") from e
    def nf4(name: str, child: nn.Module) -> nn.Module | None:
        if not isinstance(child, nn.Linear) or (targets is not None and name not in targets):
            return None
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
        return q.to("cpu")

    return _replace_children(model, nf4)


def _replace_children(model: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Swap (in place) every submodule for which ``replace(attribute_name, child)`` returns a module."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            new = replace(name, child)
            if new is not None:
                setattr(mod, name, new)
    return model


def _dequantized(q: nn.Module) -> nn.Linear:
    """An FP32 ``nn.Linear`` with a ``Linear4bit``'s de-quantized weights (``bitsandbytes.functional.dequantize_4bit``)."""
    import bitsandbytes.functional as BF

    data, state = q.weight.data, q.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks NF4 weights for its AVX-512 BF16 CPU kernel on the first eval-mode call;
        # dequantize_4bit reads only the standard layout (its own state_dict() un-packs the same way)
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(BF.dequantize_4bit(data, state).float())
        if q.bias is not None:
            lin.bias.copy_(q.bias.float())
    return lin


def dequantize_nf4(model: nn.Module) -> nn.Module:
    """The inverse of :func:`quantize_nf4` (in place, up to NF4's rounding): each ``Linear4bit`` becomes
    an FP32 ``nn.Linear`` holding its de-quantized weights."""
    import bitsandbytes as bnb

    return _replace_children(model, lambda _, child: _dequantized(child) if isinstance(child, bnb.nn.Linear4bit) else None)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold in memory (NF4 packs two weights per byte; its
    quantization state, the double-quantized absmax and their scales, is counted too)."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is None:
            continue
        stack = [qs]
        while stack:
            s = stack.pop()
            for v in vars(s).values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
                elif hasattr(v, "absmax"):
                    stack.append(v)
    return total


def base_bytes(model: nn.Module) -> int:
    """Bytes of a PEFT model's frozen base in memory (:func:`weight_bytes` less the trainable adapters)."""
    return weight_bytes(model.get_base_model()) - sum(p.numel() * p.element_size() for p in model.parameters()
                                                      if p.requires_grad)


def lora_model(base: nn.Module, opts: LoraOptions) -> nn.Module:
    """``base`` (copied, frozen; NF4 targets when ``opts.qlora``) wrapped by PEFT with LoRA on ``opts.targets``.

    Raises:
        InputSpecError: see :meth:`LoraOptions.check`.
    """
    from peft import LoraConfig, get_peft_model

    opts.check(base)
    model = _plain_copy(base)
    if opts.qlora:
        quantize_nf4(model)
    cfg = LoraConfig(r=int(opts.rank), lora_alpha=float(opts.alpha), target_modules=list(opts.targets),
                     lora_dropout=float(opts.dropout), bias="none")
    return get_peft_model(model, cfg)


def _windows(ids: torch.Tensor, rng: np.random.Generator, bs: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = rng.integers(0, len(ids) - t - 1, size=bs)
    w = torch.stack([ids[s:s + t + 1] for s in starts])
    return w[:, :-1], w[:, 1:]


def train_lm(model: nn.Module, train_ids: np.ndarray, opts: LoraOptions,
             progress: Callable[[str], None] | None = None) -> dict:
    """Next-token training of ``model``'s trainable parameters (LoRA adapters, or all of a full fine-tune).

    Args:
        model: callable ``model(input_ids int64 (batch, seq)) -> (logits float32 (batch, seq, vocab), ...)``.
        train_ids: int64 token stream, longer than ``opts.seq_len + 1``.

    Returns:
        ``{"steps", "train_s", "s_per_step", "final_loss" (nats/token, mean of the last 20 steps),
        "trainable_params", "total_params", "trainable_share", "peak_rss_mb"}`` (peak RSS is the
        process's high-water mark, ``getrusage``).

    Raises:
        InputSpecError: the token stream is shorter than one window.
    """
    ids = torch.as_tensor(np.asarray(train_ids, np.int64))
    if len(ids) < opts.seq_len + 2:
        raise InputSpecError(f"training text has {len(ids)} tokens, fewer than one window of {opts.seq_len}; "
                             "give more text or a smaller --seq-len")
    rng = np.random.default_rng(int(opts.seed))

    def loss() -> torch.Tensor:
        x, y = _windows(ids, rng, int(opts.batch_size), int(opts.seq_len))
        logits = model(x)[0]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return _fit(model, opts, loss, progress)


def _fit(model: nn.Module, opts: LoraOptions, loss: Callable[[], torch.Tensor],
         progress: Callable[[str], None] | None, weight_decay: float = 0.0) -> dict:
    """The training loop both recipes share: AdamW over ``model``'s trainable parameters, linear warm-up,
    gradient clipping at 1, ``opts.steps`` steps of ``loss()`` (which draws its own batch), on
    ``opts.threads`` threads; returns the stats :func:`train_lm` documents."""
    torch.manual_seed(int(opts.seed))
    prev = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(opts.lr), weight_decay=weight_decay)
    model.train()
    losses = []
    t0 = time.perf_counter()
    try:
        for step in range(int(opts.steps)):
            for g in opt.param_groups:
                g["lr"] = float(opts.lr) * min(1.0, (step + 1) / max(1, int(opts.warmup)))
            value = loss()
            opt.zero_grad(set_to_none=True)
            value.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(value.detach()))
            if progress and (step % 50 == 0 or step == opts.steps - 1):
                progress(f"step {step + 1}/{opts.steps} loss {np.mean(losses[-20:]):.3f} ({time.perf_counter() - t0:.0f} s)")
    finally:
        model.eval()
        torch.set_num_threads(prev)
    train_s = time.perf_counter() - t0
    n_train = sum(p.numel() for p in params)
    n_total = sum(_logical_numel(p) for p in model.parameters())
    return {"steps": int(opts.steps), "train_s": round(train_s, 2), "s_per_step": round(train_s / opts.steps, 4),
            "final_loss": float(np.mean(losses[-20:])), "trainable_params": int(n_train),
            "total_params": int(n_total), "trainable_share": n_train / max(n_total, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _logical_numel(p: torch.Tensor) -> int:
    """Weights a parameter stands for: an NF4 ``Params4bit`` packs two per byte (its ``quant_state.shape``)."""
    qs = getattr(p, "quant_state", None)
    return int(qs.shape.numel()) if qs is not None else p.numel()


def save_adapter(model: nn.Module, folder: str | Path, metadata: dict | None = None) -> Path:
    """Write a PEFT model's adapter in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``)
    and ``deepship.json`` (``metadata``), atomically: the folder appears whole or not at all."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "deepship.json").write_text(json.dumps(metadata or {}, indent=2, default=str))
    return folder


def load_adapter(base: nn.Module, folder: str | Path, qlora: bool | None = None) -> nn.Module:
    """``peft.PeftModel.from_pretrained`` on a copy of ``base`` (NF4 targets first when the adapter was
    trained as QLoRA, as ``deepship.json`` says, or when ``qlora`` is given true).

    Raises:
        InputSpecError: ``folder`` holds no PEFT adapter.
    """
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise InputSpecError(f"{folder} holds no adapter_config.json; give a folder written by optimize finetune")
    meta = json.loads((folder / "deepship.json").read_text()) if (folder / "deepship.json").is_file() else {}
    model = _plain_copy(base)
    if qlora is None:
        qlora = bool(meta.get("options", {}).get("qlora", False))
    if qlora:
        quantize_nf4(model)
    return PeftModel.from_pretrained(model, str(folder))


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and drop the PEFT wrapper (``merge_and_unload``).

    A QLoRA model is merged into a de-quantized base: the NF4 base is copied, de-quantized to FP32
    (:func:`dequantize_nf4`), wrapped again with the same ``LoraConfig``, given the trained adapter
    weights (``get_peft_model_state_dict`` / ``set_peft_model_state_dict``) and merged. The result is
    an FP32 module of the base's class with no bitsandbytes or PEFT layers; ``model`` is left as it was.
    """
    import bitsandbytes as bnb
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base = model.get_base_model()
    if not any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()):
        return copy.deepcopy(model).merge_and_unload()
    fp32 = copy.deepcopy(model).unload()  # the base without LoRA layers, still NF4
    dequantize_nf4(fp32)
    name = model.active_adapter
    again = get_peft_model(fp32, copy.deepcopy(model.peft_config[name]))
    set_peft_model_state_dict(again, get_peft_model_state_dict(model, adapter_name=name))
    return again.merge_and_unload()


def options_dict(opts: LoraOptions) -> dict:
    """The options as JSON-ready values (for ``deepship.json`` and the results file)."""
    d = asdict(opts)
    d["targets"] = list(opts.targets)
    return d


def _ppl(module: nn.Module, cfg: Any, ids: np.ndarray, window: int) -> float:
    from ...models.gpt.data import perplexity
    from ...runtimes.session import TorchSession

    with torch.no_grad():
        return perplexity(TorchSession(module, ["input_ids"], ["logits"]), cfg, ids=ids, window=window)


def check_decoder(ctx: Any) -> None:
    """Raises InputSpecError unless ``ctx`` is a model :func:`adapt_decoder` can adapt (the gpt family)."""
    if ctx.spec.family != "gpt":
        raise InputSpecError(f"finetune adapts the gpt decoders (gpt, gpt-draft); '{ctx.spec.name}' is a "
                             f"{ctx.spec.family or 'user'} model")


def validate(ctx: Any, text: str, opts: LoraOptions) -> None:
    """Everything a finetune run checks before any work: a gpt decoder, options that fit its module,
    and a readable text.

    Raises:
        InputSpecError: see :func:`check_decoder`, :meth:`LoraOptions.check`; DataError: the text.
    """
    from ...models.gpt.data import domain_text

    check_decoder(ctx)
    opts.check(ctx.module())
    domain_text(text)


def adapt_decoder(ctx: Any, text: str, opts: LoraOptions, out_dir: str | Path, do_merge: bool = True,
                  full_reference: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """LoRA (or QLoRA) on the zoo's GPT decoder for a new text, with the measures of the issue.

    Writes ``out_dir/adapter/`` (PEFT format + ``deepship.json``), with ``do_merge`` also
    ``out_dir/merged.safetensors`` (the FP32 merged module, loadable by the GPT spec's loader), and
    returns (and writes as ``out_dir/finetune.json``) the summary: held-out perplexity on the new
    text and on Shakespeare (forgetting) before and after, the merged model's perplexity and its
    largest logit difference to the unmerged adapter model, trainable share, seconds per step, peak
    RSS (MB), base weight bytes in memory (FP32 vs NF4), adapter bytes; with ``full_reference`` the
    same for a full fine-tune of the same steps (the reference of the issue).

    Args:
        ctx: a :class:`~deepship.pipeline.context.ModelContext` of a ``gpt``-family model.
        text: a name of :data:`deepship.models.gpt.data.DOMAINS` or a UTF-8 ``.txt`` path.

    Raises:
        InputSpecError: not a GPT decoder, or bad options (:meth:`LoraOptions.check`).
        DataError: the text cannot be read.
    """
    from ...models.gpt import config_of
    from ...models.gpt.data import corpus, domain_corpus
    from ...models.train import save_weights
    from ...utils import write_json_atomic

    validate(ctx, text, opts)
    cfg = config_of(ctx.spec)
    base = ctx.module()
    train_ids, held_ids = domain_corpus(text)
    shakespeare = corpus()[1][:16384]
    window = min(cfg.context, int(opts.seq_len))
    out_dir = Path(out_dir)
    before = {"domain_ppl": _ppl(base, cfg, held_ids, window), "shakespeare_ppl": _ppl(base, cfg, shakespeare, window)}
    model = lora_model(base, opts)
    stats = train_lm(model, train_ids, opts, progress)
    after = {"domain_ppl": _ppl(model, cfg, held_ids, window), "shakespeare_ppl": _ppl(model, cfg, shakespeare, window)}
    meta = {"model": ctx.spec.name, "text": text, "options": options_dict(opts), "train": stats,
            "before": before, "after": after}
    adapter = save_adapter(model, out_dir / "adapter", meta)
    res = {**meta, "method": "qlora" if opts.qlora else "lora",
           "fp32_base_bytes": weight_bytes(base), "base_bytes_in_memory": base_bytes(model),
           "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
           "domain_ppl_reduction": 1 - after["domain_ppl"] / before["domain_ppl"]}
    res["base_bytes_ratio"] = res["base_bytes_in_memory"] / res["fp32_base_bytes"]
    if do_merge:
        merged = merge(model)
        x = torch.from_numpy(np.ascontiguousarray(held_ids[: 4 * window].reshape(4, window)))
        with torch.no_grad():
            diff = float((merged(x)[0] - model(x)[0]).abs().max())
        save_weights(merged, out_dir / "merged.safetensors", {"adapter": str(adapter), "text": text})
        res["merged"] = {"domain_ppl": _ppl(merged, cfg, held_ids, window), "max_abs_logit_diff_vs_unmerged": diff,
                         "path": str(out_dir / "merged.safetensors")}
    if full_reference:
        full = _plain_copy(base)
        for p in full.parameters():
            p.requires_grad_(True)
        fstats = train_lm(full, train_ids, opts, progress)
        res["full_finetune"] = {"train": fstats, "domain_ppl": _ppl(full, cfg, held_ids, window),
                                "shakespeare_ppl": _ppl(full, cfg, shakespeare, window)}
    write_json_atomic(out_dir / "finetune.json", res)
    return res


# ---- the finetune stages (torch -> torch): the merged model as a variant like any other --------------

def text_identity(text: str) -> str:
    """What the cache key records of a text: a :data:`~deepship.models.gpt.data.DOMAINS` name, or a
    ``.txt`` file's SHA-256 (so an edited file trains a new variant)."""
    import hashlib

    from ...models.gpt.data import DOMAINS

    if text in DOMAINS:
        return text
    return "sha256:" + hashlib.sha256(Path(text).read_bytes()).hexdigest()


def text_available(text: str) -> bool:
    """Whether ``text`` (a DOMAINS name or a ``.txt`` path) can be read here (its package is installed)."""
    from ...errors import DataError
    from ...models.gpt.data import domain_text

    try:
        domain_text(text)
    except DataError:
        return False
    return True


def stage_params(text: str, opts: LoraOptions) -> dict:
    """The ``finetune`` stage's parameters for ``text`` and ``opts`` (the cache key covers all of them)."""
    d = options_dict(opts)
    d.pop("qlora")
    d.pop("threads")
    return {**d, "text": text, "text_id": text_identity(text)}


def _adapter_stage(ctx: Any, parent: Any, params: dict, out: Path, qlora: bool) -> tuple[list[str], dict]:
    from ...models.gpt import config_of
    from ...models.gpt.data import domain_corpus
    from ..prune.stages import parent_module, save_torch_variant

    names = {f for f in LoraOptions.__dataclass_fields__ if f not in ("qlora",)}
    opts = LoraOptions(**{k: v for k, v in params.items() if k in names}, qlora=qlora)
    validate(ctx, params["text"], opts)
    module = parent_module(ctx, parent)
    model = lora_model(module, opts)
    train_ids, held_ids = domain_corpus(params["text"])
    cfg = config_of(ctx.spec)
    window = min(cfg.context, int(opts.seq_len))
    ppl_before = _ppl(module, cfg, held_ids, window)
    stats = train_lm(model, train_ids, opts)
    save_adapter(model, out / "adapter", {"model": ctx.spec.name, "options": options_dict(opts), "train": stats})
    merged = merge(model)
    stats["new_text_ppl"] = {"before": ppl_before, "after": _ppl(merged, cfg, held_ids, window), "window": window}
    files, saved = save_torch_variant(ctx, merged, out)
    if saved.get("arch") is None and parent.info.get("arch") is not None and files[0].endswith(".safetensors"):
        saved["arch"] = parent.info["arch"]
    return files, {**saved, "method": "qlora" if qlora else "lora", "text": params["text"], "train": stats,
                   "adapter": "adapter/ (PEFT format)", "base_bytes_in_memory": base_bytes(model),
                   "library": "peft (LoRA, merge_and_unload)" + (", bitsandbytes NF4 (QLoRA base)" if qlora else "")}


@register_stage("finetune", "lora", "torch", "torch")
def _lora_stage(ctx: Any, parent: Any, params: dict, out: Path):
    """LoRA adapters trained on new text (PEFT), merged into the FP32 base."""
    return _adapter_stage(ctx, parent, params, out, qlora=False)


@register_stage("finetune", "qlora", "torch", "torch")
def _qlora_stage(ctx: Any, parent: Any, params: dict, out: Path):
    """QLoRA: adapters on an NF4 base (bitsandbytes), merged into the de-quantized FP32 base."""
    return _adapter_stage(ctx, parent, params, out, qlora=True)


from .encoder import ENCODER_TARGETS, PooledClassifier, train_classifier  # noqa: E402,F401  (re-exported)
