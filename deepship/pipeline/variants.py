"""Variants and their on-disk, content-addressed cache.

A :class:`Variant` is one node of a model's variant tree: a format (``torch``, ``onnx``,
``engine:<backend>``), the files that hold it, the stage and parameters that produced it from its
parent, and what that stage measured (parity, quantized nodes, ...).

Each built variant lives in ``$DEEPSHIP_CACHE/artifacts/<model>/<variant>-<key>/``. The baseline's key
(:func:`baseline_key`) hashes the model spec's fingerprint (inputs with names, dims and dtypes, outputs,
metric, source identity) and the weights' hash; every other key (:func:`variant_key`) hashes the
parent's key, the stage, its method and parameters, the data it reads (calibration or training data:
the files' hashes and the sample count) and the library versions. ``meta.json`` lists every file
with its size and SHA-256. A rerun reuses a folder whose files still match and rebuilds otherwise.
Folders are built under a temporary name and renamed, so a crash never leaves a half-written variant.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, OutputPathError
from ..exporters.onnx import save_onnx
from ..runtimes.engines import get_backend
from ..runtimes.session import open_onnx
from ..utils import atomic_dir, atomic_file, cache_root, ensure_dir, sha256_file, stable_hash

#: variant formats: ``engine:<backend>`` for any backend of :mod:`deepship.runtimes.engines`
FORMATS = ("torch", "onnx", "engine:onnxruntime", "engine:tensorrt", "engine:inductor")


@dataclass
class Variant:
    """One variant of a model.

    Attributes:
        model: model name.
        name: variant name, unique within the model (``fp32-onnx``, ``int8-static``, ...).
        parent: parent variant name (``None`` for the baseline).
        stage: stage that produced it (``baseline``, ``export``, ``quantize``, ``engine``, ...).
        method: the stage's method (``int8-dynamic``, ``onnxruntime``, ...), or ``""``.
        params: the stage's parameters.
        format: one of :data:`FORMATS`.
        precision: ``fp32``, ``bf16``, ``fp16``, ``int8``, ``int4``, ...
        key: content hash of everything that determines the artifact.
        dir: artifact folder (``None`` for in-memory baselines).
        files: artifact file names inside ``dir``; ``files[0]`` is the main file.
        info: what the stage measured or decided (parity, quantized nodes, calibration, ...).
        runtime: the runtime that runs it (``torch``, ``onnxruntime``, ...).
    """

    model: str
    name: str
    parent: str | None
    stage: str
    method: str
    params: dict[str, Any]
    format: str
    precision: str
    key: str
    dir: str | None = None
    files: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    runtime: str = ""

    @property
    def path(self) -> Path | None:
        """The main artifact file."""
        return Path(self.dir) / self.files[0] if self.dir and self.files else None

    def size_bytes(self) -> int:
        """Size on disk in bytes of all artifact files (ONNX external data included)."""
        if not self.dir:
            return 0
        return sum((Path(self.dir) / f).stat().st_size for f in self.files if (Path(self.dir) / f).exists())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Variant":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


#: bump to invalidate every cached artifact when the pipeline's output changes for the same inputs
PIPELINE_VERSION = 2


#: optional libraries that write engine artifacts; their installed versions join the key when present
OPTIONAL_WRITERS = ("openvino", "nncf")


def library_versions() -> dict[str, str]:
    """The versions of the libraries that write artifacts (torch, onnx, onnxruntime, numpy, and those of
    :data:`OPTIONAL_WRITERS` that are installed, read from their package metadata without importing them)."""
    from importlib import metadata

    import numpy
    import onnx
    import onnxruntime
    import torch

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
           "numpy": numpy.__version__}
    for name in OPTIONAL_WRITERS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def baseline_key(fingerprint: dict[str, Any], weights_id: str) -> str:
    """Cache key of a model's baseline variant: the spec's fingerprint
    (:meth:`~deepship.models.spec.ModelSpec.fingerprint`) and the weights' identity (a file's SHA-256,
    or a zoo recipe's hash)."""
    return stable_hash([fingerprint, weights_id, PIPELINE_VERSION, "baseline"])


def variant_key(parent_key: str, stage: str, method: str, params: dict[str, Any], data_key: Any,
                versions: dict[str, str]) -> str:
    """Cache key of a variant built by ``stage``/``method(params)`` from the parent with ``parent_key``.

    ``data_key`` identifies the data the stage reads (``None`` for stages that read none): the data
    files' hashes and the calibration sample count. ``versions`` are :func:`library_versions`.
    """
    return stable_hash([parent_key, stage, method, params, data_key, versions, PIPELINE_VERSION])


def artifact_dir(model: str, name: str, key: str) -> Path:
    return cache_root() / "artifacts" / model / f"{name}-{key}"


def load_cached(model: str, name: str, key: str) -> Variant | None:
    """The cached variant if its folder exists and every file matches ``meta.json``; else ``None``."""
    d = artifact_dir(model, name, key)
    meta = d / "meta.json"
    if not meta.is_file():
        return None
    try:
        m = json.loads(meta.read_text())
        v = Variant.from_dict(m["variant"])
        for f, (size, digest) in m["checksums"].items():
            p = d / f
            if not p.is_file() or p.stat().st_size != size or sha256_file(p) != digest:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    v.dir = str(d)
    return v


def write_meta(v: Variant, d: Path) -> None:
    """Write ``meta.json`` (variant + per-file size and SHA-256) into the artifact folder ``d``."""
    sums = {f: [(d / f).stat().st_size, sha256_file(d / f)] for f in v.files}
    (d / "meta.json").write_text(json.dumps({"variant": {**v.to_dict(), "dir": None}, "checksums": sums}, indent=2,
                                            default=str))


def open_variant_session(v: Variant, ctx: Any = None, threads: int | None = None):
    """Open a :class:`~deepship.runtimes.session.Session` for a built variant.

    ``ctx`` (a :class:`~deepship.pipeline.context.ModelContext`) is needed for torch variants (it
    knows how to build the module).

    Raises:
        ArtifactError: the format has no runtime here.
    """
    if v.format == "onnx":
        return open_onnx(v.path, threads=threads)
    if v.format.startswith("engine:"):
        return get_backend(v.format.split(":", 1)[1]).session(v, threads=threads)
    if v.format == "torch":
        if ctx is None:
            raise ArtifactError(f"variant {v.name} is a torch model; open it through its ModelContext")
        return ctx.torch_session(v, threads=threads)
    raise ArtifactError(f"variant {v.name} has format {v.format}, which no runtime here can run")


def publish(v: Variant, dest: str | Path) -> list[Path]:
    """Copy a variant's artifact out of the cache to ``dest`` (atomically).

    An ``.onnx`` destination gets the model file (and ``DEST.data`` if it has external data);
    any other destination is a folder that receives every artifact file.

    Raises:
        OutputPathError: ``dest`` cannot be written.
    """
    dest = Path(dest)
    if v.path is None:
        raise OutputPathError(f"variant {v.name} has no file to write")
    if dest.suffix == ".onnx" and v.format == "onnx":
        ensure_dir(dest.parent)
        if len(v.files) > 1:  # external data: re-save so the location inside matches the new name
            import onnx

            return save_onnx(onnx.load(str(v.path)), dest)
        with atomic_file(dest) as tmp:
            shutil.copyfile(v.path, tmp)
        return [dest]
    if dest.exists() and not dest.is_dir():
        raise OutputPathError(f"{dest} exists and is not a folder; give a folder or an .onnx path")
    with atomic_dir(dest) as tmp:
        for f in v.files:
            shutil.copyfile(Path(v.dir) / f, tmp / f)
    return [dest / f for f in v.files]


def cache_entries(root: Path | None = None) -> list[dict[str, Any]]:
    """The built variants in the cache: one dict per artifact folder with ``model``, ``variant``,
    ``key``, ``bytes`` (every file), ``modified`` (POSIX seconds) and ``valid`` (its files match
    ``meta.json``), sorted by model and variant."""
    base = (root or cache_root()) / "artifacts"
    out = []
    for d in sorted(base.glob("*/*")) if base.is_dir() else []:
        if not d.is_dir() or d.name.startswith("."):
            continue
        name, _, key = d.name.rpartition("-")
        files = [f for f in d.rglob("*") if f.is_file()]
        out.append({"model": d.parent.name, "variant": name, "key": key, "path": str(d),
                    "bytes": sum(f.stat().st_size for f in files), "modified": max((f.stat().st_mtime for f in files),
                                                                                   default=d.stat().st_mtime),
                    "valid": load_cached(d.parent.name, name, key) is not None})
    return out


def clear_cache(models: list[str] | None = None, root: Path | None = None) -> tuple[int, int]:
    """Delete the cache (``$DEEPSHIP_CACHE``): everything, or only the artifacts of ``models``.

    Returns:
        ``(entries removed, bytes freed)``.
    """
    base = root or cache_root()
    if not base.is_dir():
        return 0, 0
    targets = [base / "artifacts" / m for m in models] if models else [p for p in base.iterdir()]
    n = freed = 0
    for t in targets:
        if not t.exists():
            continue
        files = [f for f in t.rglob("*") if f.is_file()] if t.is_dir() else [t]
        freed += sum(f.stat().st_size for f in files)
        n += len([d for d in t.iterdir() if d.is_dir()]) if t.is_dir() and models else 1
        shutil.rmtree(t) if t.is_dir() else t.unlink()
    return n, freed
