"""Small shared helpers: atomic writes, hashing, the artifact cache folder, environment facts."""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ArtifactError, OutputPathError


def first_line(e: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (or a string), shortened at a word boundary
    to ``limit`` characters with "..." (never cut mid-word); ``""`` when it has none."""
    import textwrap

    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return textwrap.shorten(line, width=limit, placeholder=" ...") if len(line) > limit else line


def default_threads() -> int:
    """Intra-op threads: ``$DEEPSHIP_THREADS`` or the number of cores."""
    return int(os.environ.get("DEEPSHIP_THREADS", os.cpu_count() or 1))


def cache_root() -> Path:
    """The artifact cache folder: ``$DEEPSHIP_CACHE`` or ``./.deepship-cache``."""
    return Path(os.environ.get("DEEPSHIP_CACHE", ".deepship-cache")).resolve()


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) and check it is writable.

    Raises:
        OutputPathError: the folder cannot be created or written.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create output folder {p}: {e.strerror}; choose a writable path") from None
    if not os.access(p, os.W_OK):
        raise OutputPathError(f"output folder {p} is not writable; choose a writable path")
    return p


def check_writable(path: str | os.PathLike) -> Path:
    """Check, without creating anything, that ``path`` (a file or folder to be written) can be created:
    its nearest existing ancestor is a writable folder and no file stands where a folder must go.

    Returns:
        ``Path(path)``.

    Raises:
        OutputPathError: naming the path and why it cannot be written.
    """
    p = Path(path)
    cur = p if p.is_dir() else p.parent  # an existing file is replaced: its folder must be writable
    while not cur.exists():
        cur = cur.parent
    if not cur.is_dir():
        raise OutputPathError(f"cannot write {p}: {cur} is a file, not an output folder; choose another output path")
    if not os.access(cur, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {p}: output folder {cur} is not writable; choose a writable path")
    return p


#: temporary files and folders of atomic writes: ``.tmp-<name>-<pid>@<host>-<random>``
TMP_PREFIX = ".tmp-"

#: a temporary folder another machine owns (a cache shared between Ray nodes) is swept after this long
REMOTE_TEMP_AGE_S = 24 * 3600.0


def _host() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9.]", ".", socket.gethostname()) or "localhost"


def _owner() -> str:
    """``<pid>@<host>``: who owns a temporary file (its pid means nothing on another node)."""
    return f"{os.getpid()}@{_host()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temp(root: str | os.PathLike, min_age_s: float = 60.0) -> list[Path]:
    """Remove temporary files and folders of atomic writes below ``root`` that no live process owns (a
    build killed with ``kill -9`` leaves them): the owner's pid and host are in the name; a temporary
    of another host (a shared cache) is removed once older than :data:`REMOTE_TEMP_AGE_S`, names
    without an owner once older than ``min_age_s`` seconds.

    Returns:
        the paths removed.
    """
    import re
    import time

    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    here = _host()
    for p in root.rglob(f"{TMP_PREFIX}*"):
        m = re.match(rf"^{re.escape(TMP_PREFIX)}.*-(\d+)(?:@([^-]+))?-[^-]+$", p.name)
        try:
            if m is None:
                stale = time.time() - p.stat().st_mtime > min_age_s
            elif m.group(2) not in (None, here):
                stale = time.time() - p.stat().st_mtime > REMOTE_TEMP_AGE_S
            else:
                stale = not _pid_alive(int(m.group(1)))
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success replace ``dest`` with it, else delete it.

    Readers never see a half-written artifact: the rename is atomic on one filesystem. With
    ``keep_existing``, a ``dest`` that another process finished meanwhile (a shared cache: two Ray
    workers building the same content-addressed variant) is kept when ``keep_existing(dest)`` is
    true, and this build is dropped; otherwise the old ``dest`` is moved aside and removed.
    """
    dest = Path(dest)
    ensure_dir(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}-{_owner()}-", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists() and keep_existing is not None and keep_existing(dest):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}-{_owner()}-", dir=dest.parent))
            try:
                os.replace(dest, old)  # aside, atomically: readers see the old or the new folder
            except FileNotFoundError:
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if keep_existing is not None and dest.exists() and keep_existing(dest):
                shutil.rmtree(tmp, ignore_errors=True)  # another writer won the race with an equal artifact
                return
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside ``dest``; rename it onto ``dest`` on success, else delete it."""
    dest = Path(dest)
    ensure_dir(dest.parent if str(dest.parent) else ".")
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{dest.name}-{_owner()}-", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def write_text_atomic(dest: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``dest`` through a temporary file and a rename."""
    with atomic_file(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def write_json_atomic(dest: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``dest`` atomically."""
    return write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """A short (16 hex chars) hash of a JSON-serializable object, stable across runs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def check_onnx_file(path: str | os.PathLike) -> None:
    """Check that an ONNX file exists, parses, and has its external-data files beside it.

    Raises:
        ArtifactError: missing file, corrupt protobuf, or missing external-data file (named).
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"ONNX file {p} not found; check the path")
    if p.stat().st_size == 0:
        raise ArtifactError(f"{p} is empty (0 bytes), not a valid ONNX model; re-export it")
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise ArtifactError(f"{p} is not a valid ONNX model ({type(e).__name__}); re-export it") from None
    if not m.graph.node and not m.graph.output:
        raise ArtifactError(f"{p} is not a valid ONNX model (it holds no graph); re-export it")
    for init in m.graph.initializer:
        for kv in init.external_data:
            if kv.key == "location" and not (p.parent / kv.value).is_file():
                raise ArtifactError(f"external data file {p.parent / kv.value} for {p.name} is missing; "
                                    "keep the .onnx and its .data file in the same folder")


def dir_size_bytes(paths: list[Path]) -> int:
    """Total size in bytes of the given files (ONNX external data included by the caller)."""
    return sum(p.stat().st_size for p in paths if p.exists())


def machine_info() -> dict[str, Any]:
    """Machine, library versions and date, recorded in every report."""
    import numpy
    import onnx
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    flags = " ".join(x for x in ("avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8") if x in fl)
                    break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpu_features": flags,
        "logical_cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__,
        },
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
