"""Triton Inference Server model repositories: ``optimize deploy triton`` writes one, ``optimize serve``
serves one, so the folder a user ships to Triton (or KServe) is the folder deepship tested.

Layout (Triton's "Model Repository" guide)::

    model_repository/
      cnn-int8-static/
        config.pbtxt          # Triton's ModelConfig, protobuf text format
        deepship.json         # provenance: report, row key, metric, latencies per version
        1/model.onnx          # numbered versions; a redeploy with a changed artifact adds 2/, 3/ ...
      inference-service.yaml  # KServe InferenceService (predictor modelFormat triton, protocol v2)

``config.pbtxt`` is built as a ``tritonclient.grpc.model_config_pb2.ModelConfig`` message (Triton's
own schema, shipped by ``tritonclient[grpc]``) and printed with ``google.protobuf.text_format``;
every file is parsed back with that schema before the folder is renamed into place. What goes in:

- ``name``, ``backend`` and ``platform``: ``onnxruntime`` / ``onnxruntime_onnx`` for ONNX variants and
  ONNX Runtime engines (an ONNX file), ``tensorrt`` / ``tensorrt_plan`` for engines of NVIDIA's full
  TensorRT (``model.plan``). Triton's TensorRT backend cannot load TensorRT-for-RTX plans, and it has
  no backend for AOTInductor packages or Python modules: those rows are skipped with the reason
  (deploy their ONNX parent). deepship builds no OpenVINO IR, so no ``openvino`` model is written.
- ``max_batch_size`` and ``dims``: the model is opened and run at batch 1 and at the largest batch
  the report measured (:func:`deepship.serving.repository.build_model`, the server's own check);
  a model batches when axis 0 of every input and output follows the batch size, and then ``dims``
  omit the batch axis, dynamic dims are ``-1``. KV-cache decoder steps never batch (their caches
  have per-request lengths): ``max_batch_size: 0`` and full dims.
- ``dynamic_batching``: ``preferred_batch_size`` lists the measured batch sizes above 1 whose
  throughput (samples/s, the report's ``latency_ms[b].throughput``) beats every smaller measured
  batch by at least :data:`PREFERRED_GAIN`; ``max_queue_delay_microseconds`` is the measured p50
  latency at batch 1 (wait at most one single-sample run for a batch to fill).
- ``instance_group``: ``count`` instances of ``KIND_CPU`` (``KIND_GPU`` for TensorRT plans and ONNX
  variants measured on the CUDA or TensorRT execution provider).
- ``parameters``: the ONNX Runtime backend's ``intra_op_thread_count`` set to the threads the report
  measured with, so Triton runs the variant as it was timed.

deepship's server reads the same repository (:func:`load_triton_repository`): the latest version of
each model (``version_policy`` ``latest``/``specific``/``all``: the highest version selected), the
config's ``max_batch_size`` and queue delay per model, and it refuses to start when a config's
inputs or outputs disagree with the model file (Triton would refuse too).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ArtifactError, DeepshipError
from ..pipeline.variants import Variant
from ..utils import atomic_dir, ensure_dir, sha256_file, write_text_atomic
from .protocol import TRITON_CONFIG_TYPES, v2_datatype, v2_shape
from .repository import (ModelRepository, ModelSource, ServedModel, ServingError, build_model, default_serving_threads,
                         sources_from_report, valid_name)

#: a measured batch size is preferred when its throughput beats every smaller one's by this factor
PREFERRED_GAIN = 1.10
#: what ``kserve_manifest`` points at when no ``--storage-uri`` is given
DEFAULT_STORAGE_URI = "pvc://deepship-models/model_repository"
#: backends deepship writes: report format prefix -> (Triton backend, platform, file name in the version folder)
TRITON_BACKENDS = {"onnx": ("onnxruntime", "onnxruntime_onnx", "model.onnx"),
                   "engine:onnxruntime": ("onnxruntime", "onnxruntime_onnx", "model.onnx"),
                   "engine:tensorrt": ("tensorrt", "tensorrt_plan", "model.plan")}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
INSTALL_HINT = "tritonclient[grpc] is not installed: pip install 'deepship[triton]' (Triton's ModelConfig schema)"


class DeployError(DeepshipError):
    """A deployment problem: an output folder that is not a model repository, no deployable variant,
    bad ``--instances``/``--max-batch-size``."""


def _pb():
    """``(model_config_pb2, text_format)``.

    Raises:
        DeployError: tritonclient[grpc] is missing.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise DeployError(INSTALL_HINT) from None
    return model_config_pb2, text_format


def parse_config(path: str | os.PathLike):
    """Parse a ``config.pbtxt`` with Triton's ``ModelConfig`` schema.

    Returns:
        a ``tritonclient.grpc.model_config_pb2.ModelConfig`` message.

    Raises:
        ArtifactError: missing file, or text that is not a valid ModelConfig (unknown field, bad enum).
    """
    mc, text_format = _pb()
    p = Path(path)
    try:
        return text_format.Parse(p.read_text(), mc.ModelConfig())
    except OSError as e:
        raise ArtifactError(f"cannot read {p} ({e.strerror}); regenerate it with optimize deploy triton") from None
    except text_format.ParseError as e:
        raise ArtifactError(f"{p} is not a valid Triton model configuration ({e}); "
                            "regenerate it with optimize deploy triton") from None


def preferred_batch_sizes(latency_ms: dict[str, Any], max_batch_size: int) -> list[int]:
    """Measured batch sizes above 1 (and at most ``max_batch_size``) whose throughput beats every
    smaller measured batch's by :data:`PREFERRED_GAIN` (``latency_ms``: the report row's
    ``{batch: {"throughput": samples/s, ...}}``)."""
    sizes = sorted((int(b), float(t["throughput"])) for b, t in latency_ms.items()
                   if str(b).isdigit() and isinstance(t, dict) and t.get("throughput"))
    best, out = 0.0, []
    for b, thr in sizes:
        if b > 1 and b <= max_batch_size and best > 0 and thr >= best * PREFERRED_GAIN:
            out.append(b)
        best = max(best, thr)
    return out


def model_config(model: ServedModel, row: dict[str, Any], instances: int = 1, threads: int | None = None):
    """The ``ModelConfig`` message for one opened model and its report row.

    Args:
        model: the opened, warmed-up model (:func:`~deepship.serving.repository.build_model`).
        row: its ``report.json`` row (``format``, ``latency_ms``, ``provider``).
        instances: model instances Triton runs (``instance_group.count``).
        threads: ONNX Runtime intra-op threads per instance (default: those the report measured with).

    Raises:
        DeployError: a format Triton has no backend for here.
    """
    mc, _ = _pb()
    fmt = str(row.get("format", ""))
    if fmt not in TRITON_BACKENDS:
        raise DeployError(f"{model.name}: format {fmt} has no Triton backend; deploy its ONNX parent")
    backend, platform, filename = TRITON_BACKENDS[fmt]
    cfg = mc.ModelConfig(name=model.name, backend=backend, platform=platform, max_batch_size=model.max_batch_size,
                         default_model_filename=filename)
    strip = 1 if model.max_batch_size > 0 else 0
    for specs, add in ((model.inputs, cfg.input.add), (model.outputs, cfg.output.add)):
        for t in specs:
            io = add()
            io.name = t.name
            io.data_type = mc.DataType.Value(TRITON_CONFIG_TYPES[v2_datatype(t.dtype)])
            io.dims.extend(v2_shape(t.dims)[strip:])
    lat = row.get("latency_ms") or {}
    if model.max_batch_size > 0:
        db = cfg.dynamic_batching
        db.preferred_batch_size.extend(preferred_batch_sizes(lat, model.max_batch_size))
        one = (lat.get("1") or {}).get("p50_ms")
        if one:
            db.max_queue_delay_microseconds = max(1, int(round(float(one) * 1000)))
    gpu = backend == "tensorrt" or str(row.get("provider", "")) in GPU_PROVIDERS
    ig = cfg.instance_group.add()
    ig.count = instances
    ig.kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    measured = next((t.get("threads") for t in lat.values() if isinstance(t, dict) and t.get("threads")), None)
    if backend == "onnxruntime" and (threads or measured):
        cfg.parameters["intra_op_thread_count"].string_value = str(threads or measured)
    return cfg


def config_text(cfg) -> str:
    """``config.pbtxt`` text of a ModelConfig message, checked by parsing it back with the same schema.

    Raises:
        DeployError: the round trip changed the message (a bug; nothing is written).
    """
    mc, text_format = _pb()
    text = text_format.MessageToString(cfg)
    back = text_format.Parse(text, mc.ModelConfig())
    if back != cfg:
        raise DeployError(f"config.pbtxt of {cfg.name} does not parse back to itself; report this as a bug")
    return text


@dataclass
class Deployed:
    """One model written to the repository: ``name``, ``version`` (``new`` when this run added it),
    ``config`` (the message), ``path`` (its folder)."""

    name: str
    version: int
    new: bool
    path: Path
    config: Any = None
    row: dict[str, Any] = field(default_factory=dict)


def _versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()) \
        if model_dir.is_dir() else []


def _artifact_files(src: ModelSource) -> list[tuple[Path, str]]:
    """``(source file, name in the version folder)`` pairs: the main file renamed to the backend's
    default name, the ONNX external-data files the graph refers to under their own names (the graph
    names them by relative path), and ``engine.json`` beside a TensorRT plan."""
    _, _, filename = TRITON_BACKENDS[src.format]
    out = [(src.path, filename)]
    if src.format == "engine:tensorrt":
        if (src.path.parent / "engine.json").is_file():
            out.append((src.path.parent / "engine.json", "engine.json"))
        return out
    import onnx

    try:
        m = onnx.load(str(src.path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for a corrupt file
        raise ArtifactError(f"{src.path} of {src.name} is not a readable ONNX model ({type(e).__name__}); "
                            "rebuild it with optimize report") from None
    locations = set()
    for t in list(m.graph.initializer) + [a.t for n in m.graph.node for a in n.attribute if a.HasField("t")]:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in t.external_data if e.key == "location")
    for loc in sorted(locations):
        f = src.path.parent / loc
        if not f.is_file():
            raise ArtifactError(f"{f}, external data of {src.name}, is missing; rebuild it with optimize report")
        out.append((f, loc))
    return out


def _same_artifact(version_dir: Path, files: list[tuple[Path, str]]) -> bool:
    try:
        return all((version_dir / n).is_file() and sha256_file(version_dir / n) == sha256_file(s) for s, n in files)
    except OSError:
        return False


def _copy_version(files: list[tuple[Path, str]], dest: Path) -> None:
    ensure_dir(dest)
    for s, n in files:
        try:
            os.link(s, dest / n)  # same filesystem as the cache: no second copy of the weights
        except OSError:
            shutil.copy2(s, dest / n)


def write_triton_repository(report_path: str | os.PathLike, out_dir: str | os.PathLike,
                            variants: Sequence[str] | None = None, models: Sequence[str] | None = None,
                            instances: int = 1, max_batch_size: int | None = None, threads: int | None = None,
                            kserve_name: str = "deepship", storage_uri: str = DEFAULT_STORAGE_URI,
                            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write (or update) a Triton model repository from a ``report.json``.

    Every selected ``status: ok`` row in ONNX or engine format is opened and warmed up as the server
    would, its ``config.pbtxt`` built and parse-checked, and its model folder written through a
    temporary folder and a rename (a failure leaves the old folder as it was). A model folder that
    already exists keeps its versions; the new artifact becomes the next version unless it is
    byte-identical to the newest one. ``inference-service.yaml`` (KServe) is written beside them.

    Args:
        report_path: ``report.json`` from ``optimize report``.
        out_dir: the repository folder (created; an existing one must hold only model folders).
        variants, models: keep only these variant / model names (default: all deployable rows).
        instances: ``instance_group.count`` (>= 1).
        max_batch_size: largest batch (default: the largest batch the report measured, at least 1).
        threads: ONNX Runtime intra-op threads per instance (default: those the report measured with).
        kserve_name, storage_uri: the InferenceService's ``metadata.name`` and ``storageUri``.
        log: called with one line per model written or skipped.

    Returns:
        ``{"repository", "models": [{"name", "version", "new", "backend", "max_batch_size",
        "preferred_batch_size"}], "skipped": [lines], "kserve": path}``.

    Raises:
        DeployError: bad ``instances``/``max_batch_size``/``kserve_name``, an output folder that is a
            file or holds something other than model folders, nothing deployable, tritonclient missing.
        ArtifactError: an unreadable report, a missing or corrupt artifact, one failing its warm-up.
        ServingError: a variant/model filter that matches nothing.
    """
    import re

    _pb()
    if instances < 1:
        raise DeployError(f"--instances {instances} must be at least 1")
    if max_batch_size is not None and max_batch_size < 1:
        raise DeployError(f"--max-batch-size {max_batch_size} must be at least 1")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", kserve_name):
        raise DeployError(f"--kserve-name '{kserve_name}' is not a Kubernetes name; use lower-case letters, digits "
                          "and '-' (at most 63)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DeployError(f"--out {out} is a file; give a folder for the model repository")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != "inference-service.yaml"
                   and not (p.is_dir() and (p / "config.pbtxt").is_file())]
        if foreign:
            raise DeployError(f"--out {out} is not a model repository (it holds {foreign[0]}); "
                              "give an empty or new folder, or one written by optimize deploy triton")
    sources, skipped = sources_from_report(report_path, variants, models)
    deployable = []
    for s in sources:
        if s.format not in TRITON_BACKENDS:
            skipped.append(f"{s.name}: Triton has no backend for {s.format} artifacts; deploy its ONNX parent")
        elif s.format == "engine:tensorrt" and (s.variant is None or
                                                 (s.variant.info or {}).get("library") == "tensorrt_rtx"):
            skipped.append(f"{s.name}: a TensorRT-for-RTX plan, which Triton's tensorrt backend cannot load; "
                           "build the engine with NVIDIA's full TensorRT")
        else:
            deployable.append(s)
    if not deployable:
        raise DeployError("nothing to deploy" + (f" ({'; '.join(skipped[:3])})" if skipped else "")
                          + "; give a report with ONNX or engine variants")
    threads_open = threads or default_serving_threads()
    written: list[Deployed] = []
    ensure_dir(out)
    for s in deployable:
        row = s.extra.get("row", {})
        measured = [int(b) for b in (row.get("latency_ms") or {}) if str(b).isdigit()]
        mbs = max_batch_size or max(measured + [1])
        served = build_model(s, mbs, threads_open)
        cfg = model_config(served, row, instances, threads)
        text = config_text(cfg)
        files = _artifact_files(s)
        mdir = out / served.name
        old = _versions(mdir)
        same = bool(old) and _same_artifact(mdir / str(old[-1]), files)
        version = old[-1] if same else (old[-1] + 1 if old else 1)
        prov = {"tool": "deepship", "report": str(Path(report_path).resolve()), "model": s.info.get("model"),
                "variant": s.info.get("variant"), "format": s.format, "precision": s.info.get("precision"),
                "versions": {}}
        if (mdir / "deepship.json").is_file():
            try:
                prov["versions"] = json.loads((mdir / "deepship.json").read_text()).get("versions", {})
            except (OSError, ValueError):
                pass
        prov["versions"][str(version)] = {
            "key": row.get("key"), "metric": row.get("metric"), "metric_change": row.get("metric_change"),
            "size_bytes": row.get("size_bytes"), "latency_ms": row.get("latency_ms"),
            "files": {n: sha256_file(p) for p, n in files}}
        with atomic_dir(mdir) as d:
            for v in old:
                if v != version:
                    shutil.copytree(mdir / str(v), d / str(v), copy_function=_link_or_copy)
            _copy_version(files, d / str(version))
            (d / "config.pbtxt").write_text(text)
            (d / "deepship.json").write_text(json.dumps(prov, indent=2))
        written.append(Deployed(served.name, version, not same, mdir, cfg, row))
        if log:
            log(f"{served.name}: version {version}{'' if not same else ' (unchanged)'}, {cfg.backend}, "
                f"max_batch_size {cfg.max_batch_size}"
                + (f", preferred {list(cfg.dynamic_batching.preferred_batch_size)}"
                   if cfg.dynamic_batching.preferred_batch_size else ""))
    names = sorted(p.name for p in out.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file())
    manifest = out / "inference-service.yaml"
    write_text_atomic(manifest, kserve_manifest(kserve_name, storage_uri, names,
                                                gpu=any(w.config.instance_group[0].kind == _pb()[0].ModelInstanceGroup.KIND_GPU
                                                        for w in written)))
    by_reason: dict[str, list[str]] = {}
    for line in skipped:
        name, _, why = line.partition(": ")
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        if log:
            log(f"skipped {', '.join(names)}: {why}")
    return {"repository": str(out), "kserve": str(manifest), "skipped": skipped,
            "models": [{"name": w.name, "version": w.version, "new": w.new, "backend": w.config.backend,
                        "max_batch_size": w.config.max_batch_size,
                        "preferred_batch_size": list(w.config.dynamic_batching.preferred_batch_size)} for w in written]}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def kserve_manifest(name: str, storage_uri: str, models: Sequence[str], gpu: bool = False) -> str:
    """A KServe ``InferenceService`` (``serving.kserve.io/v1beta1``) whose predictor runs Triton
    (``modelFormat: triton``, Open Inference Protocol ``v2``) on the repository at ``storage_uri``
    (``s3://``, ``gs://``, ``pvc://``...). ``models`` go in an annotation for people reading it.
    Written with PyYAML."""
    import yaml

    limits = {"cpu": "2", "memory": "4Gi"}
    if gpu:
        limits["nvidia.com/gpu"] = "1"
    doc = {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
           "metadata": {"name": name, "annotations": {"deepship/models": ",".join(models)}},
           "spec": {"predictor": {"model": {"modelFormat": {"name": "triton"}, "protocolVersion": "v2",
                                            "storageUri": storage_uri,
                                            "resources": {"requests": dict(limits), "limits": limits}}}}}
    return yaml.safe_dump(doc, sort_keys=False)


def is_triton_repository(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding at least one ``<model>/config.pbtxt`` (and is not a
    deepship variant or engine folder)."""
    p = Path(path)
    return p.is_dir() and not (p / "meta.json").is_file() and any(
        (c / "config.pbtxt").is_file() for c in p.iterdir() if c.is_dir())


def _served_version(cfg, model_dir: Path) -> int:
    have = _versions(model_dir)
    which = cfg.version_policy.WhichOneof("policy_choice")
    if which == "specific":
        have = [v for v in have if v in set(cfg.version_policy.specific.versions)]
    if not have:
        raise ArtifactError(f"{model_dir} has no version folder the config's version_policy selects; "
                            "regenerate it with optimize deploy triton")
    return have[-1]


def load_triton_repository(path: str | os.PathLike, models: Sequence[str] | None = None,
                           threads: int | None = None) -> ModelRepository:
    """Open a Triton model repository for deepship's server.

    Each ``<model>/config.pbtxt`` is parsed with Triton's schema; the highest version its
    ``version_policy`` selects is opened with the config's ``default_model_filename``, warmed up at
    batch 1 and ``max_batch_size``, and its signature compared with the config's ``input``/``output``
    (names, data types, dims). Each model batches up to its config's ``max_batch_size`` and waits at
    most its ``max_queue_delay_microseconds``; without ``dynamic_batching`` its requests run alone.

    Args:
        path: the repository folder.
        models: serve only these model names (default: all).
        threads: intra-op threads per session (default: the config's ``intra_op_thread_count``, else
            :func:`~deepship.serving.repository.default_serving_threads`).

    Raises:
        ArtifactError: an invalid config, a missing version or model file, a config that disagrees
            with its model, a model failing its warm-up.
        ServingError: a backend deepship cannot run, a model filter that matches nothing, no model.
    """
    root = Path(path)
    dirs = sorted(c for c in root.iterdir() if c.is_dir() and (c / "config.pbtxt").is_file())
    if models:
        unknown = [m for m in models if m not in {d.name for d in dirs}]
        if unknown:
            raise ServingError(f"model '{unknown[0]}' is not in {root}; it has {', '.join(d.name for d in dirs)}")
        dirs = [d for d in dirs if d.name in models]
    served, skipped = [], []
    for d in dirs:
        cfg = parse_config(d / "config.pbtxt")
        name = cfg.name or d.name
        if name != d.name or not valid_name(name):
            raise ArtifactError(f"{d / 'config.pbtxt'} names the model '{name}' but its folder is '{d.name}'; "
                                "Triton needs them equal")
        fmt = {"onnxruntime": "onnx", "onnxruntime_onnx": "onnx", "tensorrt": "engine:tensorrt",
               "tensorrt_plan": "engine:tensorrt"}.get(cfg.backend or cfg.platform)
        if fmt is None:
            skipped.append(f"{name}: backend {cfg.backend or cfg.platform} is not run by deepship's server")
            continue
        version = _served_version(cfg, d)
        vdir = d / str(version)
        main = vdir / (cfg.default_model_filename or TRITON_BACKENDS[fmt if fmt != "onnx" else "onnx"][2])
        if not main.is_file():
            raise ArtifactError(f"{main} is missing (version {version} of {name}); regenerate the repository")
        variant = None
        if fmt == "engine:tensorrt":
            meta = json.loads((vdir / "engine.json").read_text()) if (vdir / "engine.json").is_file() else {}
            variant = Variant(name, "tensorrt", None, "engine", "tensorrt", {}, fmt, meta.get("precision", ""), "",
                              dir=str(vdir), files=[main.name, "engine.json"], info=meta, runtime="tensorrt")
        prov = {}
        if (d / "deepship.json").is_file():
            try:
                prov = json.loads((d / "deepship.json").read_text())
            except ValueError:
                prov = {}
        src = ModelSource(name, main, fmt, variant,
                          info={"model": prov.get("model", name), "variant": prov.get("variant", ""),
                                "format": fmt, "precision": prov.get("precision", ""), "artifact": str(main),
                                "version": str(version)})
        t = threads
        if not t and "intra_op_thread_count" in cfg.parameters:
            t = int(cfg.parameters["intra_op_thread_count"].string_value or 0)
        m = build_model(src, max(cfg.max_batch_size, 1), t or default_serving_threads())
        _check_signature(cfg, m, d / "config.pbtxt")
        m.platform = cfg.platform or m.platform
        if cfg.max_batch_size > 0:
            m.batching = {"max_batch_size": cfg.max_batch_size,
                          "max_queue_delay_ms": cfg.dynamic_batching.max_queue_delay_microseconds / 1000.0,
                          "dynamic_batching": cfg.HasField("dynamic_batching")}
        served.append(m)
    return ModelRepository(served, skipped)


def _check_signature(cfg, model: ServedModel, where: Path) -> None:
    """Raise ArtifactError when the config's batching, inputs or outputs disagree with the opened model."""
    mc, _ = _pb()
    if cfg.max_batch_size > 0 and model.max_batch_size == 0:
        raise ArtifactError(f"{where} sets max_batch_size {cfg.max_batch_size} but {model.name} does not batch on "
                            "axis 0; set max_batch_size: 0 or regenerate with optimize deploy triton")
    strip = 1 if cfg.max_batch_size > 0 else 0
    for kind, declared, actual in (("input", cfg.input, model.inputs), ("output", cfg.output, model.outputs)):
        have = {t.name: (TRITON_CONFIG_TYPES[v2_datatype(t.dtype)], v2_shape(t.dims)[strip:]) for t in actual}
        want = {io.name: (mc.DataType.Name(io.data_type), list(io.dims)) for io in declared}
        if kind == "output":  # Triton allows a config to list a subset of the outputs
            have = {k: v for k, v in have.items() if k in want} if set(want) <= set(have) else have
        if have != want:
            bad = next(iter(sorted(set(have) ^ set(want))), None) or next(k for k in want if want[k] != have.get(k))
            raise ArtifactError(f"{where}: {kind} '{bad}' is {want.get(bad, 'missing')} in the config but "
                                f"{have.get(bad, 'missing')} in {model.name}'s model file; regenerate with "
                                "optimize deploy triton")
