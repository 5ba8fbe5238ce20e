"""The model repository: which built variants the server loads, under which names, with which signature.

Sources (:func:`load_repository`):

- a ``report.json`` from ``optimize report``: every row with ``status == "ok"`` whose format has a
  runtime here (``onnx`` through ONNX Runtime, ``engine:<backend>`` through that engine backend's
  session) is served as ``<model>-<variant>`` (``cnn-fp32-onnx``, ``cnn-int8-static``,
  ``cnn-ort-engine``). Torch rows (``fp32-torch``, ``bf16-torch``) are skipped with a reason: the
  server runs exported artifacts, not Python modules;
- an ``.onnx`` file, served under its file stem, or ``NAME=path.onnx`` to choose the name;
- a variant folder from the cache (with ``meta.json``) or a published ONNX Runtime engine folder
  (``optimize engine -o DIR``: ``model.ort.onnx`` + ``engine.json``).

Every artifact is checked before the server binds its port: a missing file, a corrupt model or a
checksum that no longer matches the cache's ``meta.json`` fails start-up with an
:class:`~deepship.errors.ArtifactError` naming the file. Each model is then warmed up (one run at
batch 1 and one at the largest batch) so the first request pays no allocation.

Model names are checked against :data:`NAME_RE` (letters, digits, ``.``, ``_``, ``-``; no ``..``):
they appear in URLs and never reach the file system after start-up.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import ArtifactError, DeepshipError, InputSpecError, StageError
from ..models.spec import TensorSpec, parse_input_spec
from ..pipeline.variants import Variant
from ..runtimes.engines import get_backend
from ..runtimes.session import open_onnx
from ..utils import first_line, sha256_file
from .protocol import ORT_TO_NUMPY

#: Valid served-model names: 1-128 characters, letters, digits, ``.``, ``_``, ``-``; no ``..``.
NAME_RE = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Triton platform names by backend (``platform`` in model metadata); others are ``deepship_<backend>``.
TRITON_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
#: Report row formats the server can run (``engine:*`` through :func:`deepship.runtimes.engines.get_backend`).
SERVABLE_PREFIXES = ("onnx", "engine:")


class ServingError(DeepshipError):
    """A serving set-up problem: no servable variant selected, a duplicate or invalid model name,
    an unknown variant filter, a port in use."""


def valid_name(name: str) -> bool:
    """True if ``name`` is a valid served-model name (see :data:`NAME_RE`)."""
    return bool(NAME_RE.match(name or ""))


@dataclass
class ServedModel:
    """One model the server answers for.

    Attributes:
        name: the name in URLs (``/v2/models/{name}/infer``).
        session: a :class:`~deepship.runtimes.session.Session` (``run(dict) -> dict`` of numpy arrays).
        inputs, outputs: the signature; ``dims`` entries are ``int`` (static) or ``str`` (dynamic,
            e.g. ``"batch"``); ``dtype`` is a numpy dtype name.
        max_batch_size: most samples per executed batch; ``0`` when axis 0 is not a batch axis (then
            requests are never merged).
        platform: Triton platform string (``onnxruntime_onnx``, ``tensorrt_plan``, else ``deepship_<backend>``).
        backend: the runtime backend (``onnxruntime``, ``tensorrt``, ``inductor``, ...).
        source: facts shown in the model configuration: model, variant, format, precision,
            provider, artifact path.
        kind: ``"tensor"`` for request/response models, ``"decoder"`` for KV-cache decoder steps
            (:func:`is_kv_decoder`; never batched, served by :mod:`deepship.serving.generate` too),
            ``"streaming-asr"`` for ASR chunk graphs (batched by chunk; :mod:`deepship.serving.asr`).
            Extensions select their models by ``kind`` (see :mod:`deepship.serving.app`).
        extra: the report row and model section, for extensions that need more (KV-cache layout,
            stream state names).
        batching: this model's overrides of the server's
            :class:`~deepship.serving.batcher.BatcherConfig` (``max_batch_size``,
            ``max_queue_delay_ms``, ``dynamic_batching``), e.g. from a Triton ``config.pbtxt``.
    """

    name: str
    session: Any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = 0
    platform: str = "onnxruntime_onnx"
    backend: str = "onnxruntime"
    source: dict[str, Any] = field(default_factory=dict)
    kind: str = "tensor"
    extra: dict[str, Any] = field(default_factory=dict)
    batching: dict[str, Any] = field(default_factory=dict)

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on validated feeds (arrays ``(batch, ...)`` of the signature's dtypes)."""
        return self.session.run(feeds)


@dataclass
class ModelSource:
    """Where one served model comes from, before it is opened.

    Attributes:
        name: served name; path: main artifact file; format: ``onnx`` or ``engine:<backend>``;
        variant: a :class:`~deepship.pipeline.variants.Variant` for engine formats (else ``None``);
        info: model / variant / precision facts; declared_inputs: input specs from the report
        (used when a session cannot tell its own signature).
    """

    name: str
    path: Path
    format: str
    variant: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    declared_inputs: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def sources_from_report(report_path: str | os.PathLike, variants: Sequence[str] | None = None,
                        models: Sequence[str] | None = None) -> tuple[list[ModelSource], list[str]]:
    """Select the servable rows of a ``report.json``.

    Args:
        report_path: the report written by ``optimize report``.
        variants: variant names to keep (default: every servable one).
        models: model names to keep (default: all).

    Returns:
        ``(sources, skipped)``: ``skipped`` holds one line per row left out and why.

    Raises:
        ArtifactError: the report cannot be read or has no ``models`` list.
        ServingError: a ``variants``/``models`` filter that matches nothing in the report.
    """
    p = Path(report_path)
    if not p.is_file():
        raise ArtifactError(f"report {p} not found; give a report.json written by optimize report, or model files")
    try:
        rep = json.loads(p.read_text())
        mods = rep["models"]
        assert isinstance(mods, list)
    except (OSError, ValueError, KeyError, AssertionError, TypeError):
        raise ArtifactError(f"{p} is not a readable report.json (no 'models' list); "
                            "write one with optimize report") from None
    out: list[ModelSource] = []
    skipped: list[str] = []
    seen_models, seen_variants = set(), set()
    for m in mods:
        mname = str(m.get("model", ""))
        seen_models.add(mname)
        if models and mname not in models:
            continue
        for row in m.get("variants", []):
            vname = str(row.get("variant", ""))
            seen_variants.add(vname)
            if variants and vname not in variants:
                continue
            name = f"{mname}-{vname}"
            fmt = str(row.get("format", ""))
            if row.get("status") != "ok":
                skipped.append(f"{name}: failed in the report ({str(row.get('error', ''))[:80]})")
                continue
            if not fmt.startswith(SERVABLE_PREFIXES):
                skipped.append(f"{name}: format {fmt or '?'} is not served (the server runs ONNX and engine "
                               "artifacts; export or build an engine)")
                continue
            if not row.get("artifact"):
                raise ArtifactError(f"report row {name} has no artifact path; rebuild the report with optimize report")
            if fmt.startswith("engine:"):
                why = _backend_unavailable(fmt.split(":", 1)[1])
                if why:
                    skipped.append(f"{name}: {why}")
                    continue
            art = Path(row["artifact"])
            src = ModelSource(name, art, fmt, info={"model": mname, "variant": vname, "format": fmt,
                                                     "precision": row.get("precision", ""), "artifact": str(art)},
                              declared_inputs=list(m.get("inputs") or []), extra={"row": row, "model": {
                                  k: v for k, v in m.items() if k != "variants"}})
            if fmt.startswith("engine:"):
                src.variant = _variant_from_meta(art.parent, name)
            out.append(src)
    if models:
        unknown = [x for x in models if x not in seen_models]
        if unknown:
            raise ServingError(f"model '{unknown[0]}' is not in {p}; it has {', '.join(sorted(seen_models))}")
    if variants:
        unknown = [x for x in variants if x not in seen_variants]
        if unknown:
            raise ServingError(f"variant '{unknown[0]}' is not in {p}; it has {', '.join(sorted(seen_variants))}")
    return out, skipped


def _backend_unavailable(backend: str) -> str:
    """Why an engine backend cannot run here (``""`` if it can): unknown, or its library or device
    is missing (a TensorRT engine in a report built on the GPU machine, served on a CPU one)."""
    try:
        ok, why = get_backend(backend).available()
    except StageError as e:
        return str(e)
    return "" if ok else f"engine backend {backend} is not available here ({why})"


def _variant_from_meta(d: Path, name: str):
    """The cached :class:`Variant` of folder ``d`` (its ``meta.json``), checksums verified.

    Raises:
        ArtifactError: no or unreadable ``meta.json``, a missing file, a checksum mismatch.
    """
    meta = d / "meta.json"
    if not meta.is_file():
        raise ArtifactError(f"{meta} is missing for {name}; serve the variant folder from the cache or rebuild it")
    try:
        m = json.loads(meta.read_text())
        v = Variant.from_dict(m["variant"])
        sums = m["checksums"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ArtifactError(f"{meta} is not a deepship variant meta.json; rebuild the variant") from None
    for f, (size, digest) in sums.items():
        fp = d / f
        if not fp.is_file():
            raise ArtifactError(f"{fp} of {name} is missing; rebuild the variant (optimize report)")
        if fp.stat().st_size != size or sha256_file(fp) != digest:
            raise ArtifactError(f"{fp} of {name} does not match its checksum in meta.json; rebuild the variant")
    if not v.files:
        raise ArtifactError(f"{meta} lists no files; rebuild the variant")
    v.dir = str(d)
    return v


def sources_from_paths(paths: Iterable[str]) -> list[ModelSource]:
    """Model sources from ``.onnx`` files and variant / engine folders, each ``PATH`` or ``NAME=PATH``.

    Raises:
        ArtifactError: a path that does not exist or is neither an ``.onnx`` file nor a variant or
            engine folder.
    """
    out = []
    for ref in paths:
        name, _, path = ref.rpartition("=") if "=" in ref else ("", "", ref)
        p = Path(path)
        if p.is_dir():
            if (p / "meta.json").is_file():
                v = _variant_from_meta(p, name or p.name)
                fmt = v.format
                src = ModelSource(name or f"{v.model}-{v.name}", Path(v.dir) / v.files[0], fmt,
                                  v if fmt.startswith("engine:") else None,
                                  {"model": v.model, "variant": v.name, "format": fmt, "precision": v.precision,
                                   "artifact": str(Path(v.dir) / v.files[0])})
            elif (p / "engine.json").is_file() and (p / "model.ort.onnx").is_file():
                files = ["model.ort.onnx"] + (["model.ort.onnx.data"] if (p / "model.ort.onnx.data").is_file() else [])
                v = Variant(p.name, "ort-engine", None, "engine", "onnxruntime", {}, "engine:onnxruntime", "fp32", "",
                            dir=str(p.resolve()), files=files + ["engine.json"], runtime="onnxruntime")
                src = ModelSource(name or p.name, p / "model.ort.onnx", "engine:onnxruntime", v,
                                  {"model": p.name, "variant": "ort-engine", "format": "engine:onnxruntime",
                                   "artifact": str(p / "model.ort.onnx")})
            else:
                raise ArtifactError(f"{p} is neither a variant folder (meta.json) nor an engine folder "
                                    "(model.ort.onnx + engine.json); give an .onnx file or such a folder")
        elif p.suffix == ".onnx" and _is_cached_variant_file(p):
            out.extend(sources_from_paths([f"{name}={p.parent}" if name else str(p.parent)]))
            continue
        elif p.suffix == ".onnx":
            if not p.is_file():
                raise ArtifactError(f"ONNX file {p} not found; check the path")
            src = ModelSource(name or _sanitize(p.stem), p, "onnx",
                              info={"model": p.stem, "variant": "onnx", "format": "onnx", "artifact": str(p)})
        elif p.suffix == ".json":
            raise ArtifactError(f"{p}: give a report.json alone (not mixed with artifact paths)")
        else:
            raise ArtifactError(f"{p} not found or not servable; give a report.json, an .onnx file or a variant folder")
        out.append(src)
    return out


def _is_cached_variant_file(p: Path) -> bool:
    """True if ``p`` is the main file of a cached variant folder (so it is named ``<model>-<variant>``)."""
    try:
        return p.is_file() and json.loads((p.parent / "meta.json").read_text())["variant"]["files"][0] == p.name
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False


def _sanitize(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    return re.sub(r"\.{2,}", ".", s)[:128]


def open_source(src: ModelSource, threads: int | None = None):
    """Open a :class:`~deepship.runtimes.session.Session` for a source.

    Raises:
        ArtifactError: missing or corrupt model, missing external data, unknown format.
    """
    if src.format == "onnx":
        return open_onnx(src.path, threads=threads)
    if src.format.startswith("engine:"):
        try:
            return get_backend(src.format.split(":", 1)[1]).session(src.variant, threads=threads)
        except StageError as e:
            raise ArtifactError(f"{src.name}: {e}") from None
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{src.name}: cannot open engine at {src.path} ({type(e).__name__}: "
                                f"{str(e)[:120]}); rebuild it") from None
    raise ArtifactError(f"{src.name}: format {src.format} is not served; serve its ONNX export or an engine built from it")


def session_signature(session: Any, declared: Sequence[str] = ()) -> tuple[list[TensorSpec], list[TensorSpec] | None]:
    """Input and output specs of a session.

    ONNX Runtime sessions (anything with ``.sess.get_inputs()``) describe themselves; a session
    from another engine backend may expose ``input_specs`` / ``output_specs`` (lists of
    :class:`TensorSpec`); otherwise the report's declared inputs (``x:float32[batch,1,8,8]``) are
    used and the outputs are read from the warm-up run (``None`` here).

    Raises:
        ArtifactError: the signature cannot be found, or uses a type the protocol cannot carry.
    """
    ort = getattr(session, "sess", None)
    if ort is not None and hasattr(ort, "get_inputs"):
        def specs(args):
            res = []
            for a in args:
                dt = ORT_TO_NUMPY.get(a.type)
                if dt is None or dt == "object":
                    raise ArtifactError(f"tensor '{a.name}' has type {a.type}, which the server cannot carry")
                dims = tuple(d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else f"d{i}")
                             for i, d in enumerate(a.shape))
                res.append(TensorSpec(a.name, dims, dt))
            return res

        return specs(ort.get_inputs()), specs(ort.get_outputs())
    if getattr(session, "input_specs", None):
        return list(session.input_specs), list(getattr(session, "output_specs", None) or []) or None
    if declared:
        try:
            return [parse_input_spec(t) for t in declared], None
        except InputSpecError as e:
            raise ArtifactError(f"cannot read the model's inputs: {e}") from None
    raise ArtifactError("the session does not describe its inputs; give an ONNX model or an engine with input_specs")


def build_model(src: ModelSource, max_batch_size: int, threads: int | None = None) -> ServedModel:
    """Open, describe and warm up one source.

    The model batches (``max_batch_size > 0``) when axis 0 of every input is dynamic and every
    output's axis 0 follows the batch size in the warm-up runs (batch 1 and ``max_batch_size``).

    Raises:
        ArtifactError: the artifact cannot be opened, or fails its warm-up run.
        ServingError: an invalid name.
    """
    if not valid_name(src.name):
        raise ServingError(f"invalid model name '{src.name[:80]}'; use letters, digits, '.', '_' and '-' "
                           "(NAME=path to choose one)")
    sess = open_source(src, threads)
    ins, outs = session_signature(sess, src.declared_inputs)
    decoder = is_kv_decoder(ins)
    # a KV-cache decoder's requests carry caches of different lengths: never merged
    batchable = max_batch_size > 0 and not decoder and all(t.dims and isinstance(t.dims[0], str) for t in ins)

    def warm(b: int) -> dict[str, np.ndarray]:
        if decoder:  # one token after an empty cache
            feeds = {t.name: (np.zeros((b, 1), np.int64) if t.name == "input_ids" else
                              np.zeros([b if j == 0 else (d if isinstance(d, int) else 0) for j, d in enumerate(t.dims)],
                                       t.dtype)) for t in ins}
        else:
            feeds = {t.name: t.random({"batch": b, t.dims[0] if t.dims and isinstance(t.dims[0], str) else "batch": b},
                                      seed=i) for i, t in enumerate(ins)}
        return sess.run(feeds)

    try:
        res = warm(1)
    except DeepshipError as e:
        raise ArtifactError(f"{src.name} ({src.path}) fails its warm-up run: {e}") from None
    except Exception as e:  # a runtime crashing on its own model: fail start-up, name it
        raise ArtifactError(f"{src.name} ({src.path}) fails its warm-up run: {type(e).__name__}: "
                            f"{first_line(e, 150)}") from None
    batchable = batchable and all(np.ndim(v) > 0 and np.shape(v)[0] == 1 for v in res.values())
    if batchable and max_batch_size > 1:
        try:  # also allocates the largest batch's buffers up front
            big = warm(max_batch_size)
            batchable = all(np.ndim(v) > 0 and np.shape(v)[0] == max_batch_size for v in big.values())
        except Exception:  # e.g. an engine built for a fixed batch size: serve it unbatched
            batchable = False
    if outs is None:
        outs = [TensorSpec(k, (("batch",) if batchable else ()) + tuple(np.shape(v)[1 if batchable else 0:]),
                           np.asarray(v).dtype.name) for k, v in res.items()]
    info = dict(src.info)
    info["provider"] = getattr(sess, "provider", "")
    info["threads"] = getattr(sess, "threads", "")
    backend = "onnxruntime" if src.format == "onnx" else src.format.split(":", 1)[-1]
    return ServedModel(src.name, sess, ins, outs, max_batch_size if batchable else 0,
                       platform=TRITON_PLATFORMS.get(backend, f"deepship_{backend}"), backend=backend,
                       source=info, kind="decoder" if decoder else ("streaming-asr" if is_asr_chunk_model(ins) else "tensor"),
                       extra=src.extra)


#: the explicit states of the streaming ASR chunk graph (:mod:`deepship.models.asr`)
ASR_STATE_INPUTS = ("sub_cache", "att_cache", "conv_cache", "lstm_h", "lstm_c")


def is_asr_chunk_model(inputs: Sequence[TensorSpec]) -> bool:
    """True for the streaming ASR chunk graph: inputs ``x`` and the explicit states of :mod:`deepship.models.asr`."""
    return {t.name for t in inputs} == {"x", *ASR_STATE_INPUTS}


def is_kv_decoder(inputs: Sequence[TensorSpec]) -> bool:
    """True for a decoder step graph with an explicit KV cache: inputs ``input_ids`` and
    ``past_key_values.{i}.key/value`` (the Optimum / ONNX Runtime GenAI names that
    :mod:`deepship.exporters.kv` writes). Such models are served with ``kind="decoder"``."""
    names = {t.name for t in inputs}
    return "input_ids" in names and any(n.startswith("past_key_values.") for n in names)


class ModelRepository:
    """The served models by name.

    Args:
        models: :class:`ServedModel` objects (names unique).
        skipped: lines naming report rows that were not loaded and why.

    Raises:
        ServingError: duplicate names, or no model at all.
    """

    def __init__(self, models: Sequence[ServedModel], skipped: Sequence[str] = ()):
        self.models: dict[str, ServedModel] = {}
        for m in models:
            if m.name in self.models:
                raise ServingError(f"two models are named '{m.name}'; name them with NAME=path")
            self.models[m.name] = m
        self.skipped = list(skipped)
        if not self.models:
            raise ServingError("no servable model selected" + (f" ({'; '.join(self.skipped[:3])})" if self.skipped else "")
                               + "; give a report.json with ONNX or engine variants, or .onnx files")

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    def names(self) -> list[str]:
        return list(self.models)

    def __len__(self) -> int:
        return len(self.models)


def load_repository(refs: Sequence[str], variants: Sequence[str] | None = None, models: Sequence[str] | None = None,
                    max_batch_size: int = 64, threads: int | None = None) -> ModelRepository:
    """Load a repository from ``[report.json]`` or artifact references (see the module docstring).

    Args:
        refs: one ``report.json``, or ``.onnx`` files / variant folders (``NAME=PATH`` to name them).
        variants, models: filters for a report (variant names, model names).
        max_batch_size: most samples per batch for models with a batch axis (``0``: never merge).
        threads: intra-op threads per session (default: :func:`default_serving_threads`).

    Raises:
        ArtifactError: a missing or corrupt artifact, or one failing its warm-up (start-up fails).
        ServingError: nothing to serve, a filter that matches nothing, invalid or duplicate names.
    """
    if not refs:
        raise ServingError("nothing to serve; give a report.json or .onnx files / variant folders")
    threads = threads or default_serving_threads()
    if len(refs) == 1 and refs[0].endswith(".json"):
        sources, skipped = sources_from_report(refs[0], variants, models)
    else:
        if variants or models:
            raise ServingError("--variant/--model filter a report.json; with artifact paths, list the ones to serve")
        sources, skipped = sources_from_paths(refs), []
    return ModelRepository([build_model(s, max_batch_size, threads) for s in sources], skipped)


def default_serving_threads() -> int:
    """Intra-op threads per served session: ``$DEEPSHIP_THREADS``, else all cores but one (the HTTP
    event loop needs a core of its own; at least 1)."""
    env = os.environ.get("DEEPSHIP_THREADS")
    if env:
        return max(1, int(env))
    return max(1, (os.cpu_count() or 2) - 1)
