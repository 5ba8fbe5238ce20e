"""ONNX Runtime execution-provider selection, with the provider that actually ran recorded.

ONNX Runtime takes a priority list of execution providers (EPs) and silently drops those it cannot
load (``onnxruntime`` instead of ``onnxruntime-gpu``, missing CUDA/cuDNN/TensorRT libraries); it also
hands nodes an EP cannot run to the next one. So the provider asked for is not evidence of the one
that ran. This module:

- maps short names (``tensorrt``, ``cuda``, ``cpu``, ``auto``) to EP names and per-EP options
  (TensorRT EP: FP16/INT8 flags, engine and timing caches, optimization profiles from the named
  dynamic dims);
- after the session is created, records ``session.get_providers()`` (the EPs that loaded) and,
  from one profiled run, how many graph nodes each EP executed (``node_placement``): the provider
  recorded in the report is the EP that ran the most nodes;
- with ``strict=True`` raises instead of falling back, and sets ONNX Runtime's
  ``session.disable_cpu_ep_fallback`` so no node silently moves to the CPU.

References: ONNX Runtime docs, "Execution Providers", "TensorRT Execution Provider" (provider
options ``trt_fp16_enable``, ``trt_int8_enable``, ``trt_engine_cache_enable``,
``trt_timing_cache_enable``, ``trt_profile_min_shapes``/``opt``/``max``), "Profiling tools".
"""
from __future__ import annotations

import collections
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import StageError
from ...utils import first_line
from .tensorrt import profile_shapes

ALIASES = {
    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider",
    "dnnl": "DnnlExecutionProvider", "openvino": "OpenVINOExecutionProvider",
}
#: ``auto`` tries these, in this order, among the EPs this onnxruntime build can load.
AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
CPU = "CPUExecutionProvider"

INSTALL_HINT = {
    "TensorrtExecutionProvider": "install onnxruntime-gpu and TensorRT 10 libraries on a machine with an NVIDIA GPU",
    "CUDAExecutionProvider": "install onnxruntime-gpu (CUDA 13, cuDNN 9) on a machine with an NVIDIA GPU",
}


@dataclass
class ProviderRecord:
    """What was asked and what ran.

    Attributes:
        requested: EP names in priority order, as passed to ONNX Runtime.
        available: EPs this onnxruntime build can load (``onnxruntime.get_available_providers()``).
        loaded: EPs the session kept (``session.get_providers()``).
        node_placement: ``{EP: nodes executed}`` from one profiled run (empty if not profiled).
        ran: the EP that executed the most nodes (``loaded[0]`` when not profiled).
        fell_back: True when ``ran`` is not the first EP requested.
    """

    requested: list[str]
    available: list[str]
    loaded: list[str]
    node_placement: dict[str, int] = field(default_factory=dict)
    ran: str = ""
    fell_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_providers(requested: str | Sequence[str] | None) -> list[str]:
    """Turn ``"cuda,cpu"``, ``["tensorrt", "cuda"]``, ``"auto"`` or full EP names into EP names.

    ``auto`` is every EP of :data:`AUTO_ORDER` this onnxruntime build can load. The CPU EP is always
    appended last (ONNX Runtime's own fallback).

    Raises:
        StageError: an EP name ONNX Runtime does not know (lists the known short names).
    """
    import onnxruntime as ort

    if requested is None:
        items = ["cpu"]
    elif isinstance(requested, str):
        items = [x.strip() for x in requested.split(",") if x.strip()]
    else:
        items = [str(x).strip() for x in requested]
    known = set(ort.get_all_providers())
    out: list[str] = []
    for it in items or ["cpu"]:
        if it.lower() == "auto":
            avail = ort.get_available_providers()
            names = [p for p in AUTO_ORDER if p in avail]
        else:
            name = ALIASES.get(it.lower(), it)
            if name not in known:
                raise StageError(f"unknown execution provider '{it}'; use auto, {', '.join(sorted(set(ALIASES) - {'trt'}))} "
                                 "or a full ONNX Runtime provider name")
            names = [name]
        out += [n for n in names if n not in out]
    if CPU not in out:
        out.append(CPU)
    return out


def provider_options(providers: Sequence[str], precision: str = "fp32", cache_dir: str | Path | None = None,
                     shapes: Mapping[str, Sequence[int] | str] | None = None) -> list[dict[str, str]]:
    """Per-EP options, aligned with ``providers``.

    Args:
        precision: ``fp16`` sets ``trt_fp16_enable``; ``int8`` sets ``trt_int8_enable`` (the model
            should be an explicit QDQ model, whose scales the TensorRT EP uses).
        cache_dir: TensorRT EP engine and timing caches (persisted and reused across sessions).
        shapes: TensorRT EP optimization profile, ``{"min": "x:1x1x8x8", "opt": ..., "max": ...}``
            (see :func:`trt_profile_shapes`).
    """
    opts = []
    for p in providers:
        o: dict[str, str] = {}
        if p == "TensorrtExecutionProvider":
            o["trt_fp16_enable"] = "True" if precision == "fp16" else "False"
            o["trt_int8_enable"] = "True" if precision == "int8" else "False"
            if cache_dir:
                o.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
                          "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache_dir)})
            for k in ("min", "opt", "max"):
                if shapes and shapes.get(k):
                    o[f"trt_profile_{k}_shapes"] = str(shapes[k])
        opts.append(o)
    return opts


def trt_profile_shapes(onnx_path: str | Path, ranges: Mapping[str, Sequence[int]] | None = None) -> dict[str, str]:
    """TensorRT EP profile strings ``{"min": "x:1x1x8x8,...", "opt": ..., "max": ...}``.

    Args:
        onnx_path: the model; its inputs' named dynamic dims (``dim_param``) get their ranges from
        ranges: ``{dim name: (min, opt, max)}`` (see :func:`deepship.runtimes.engines.tensorrt.parse_shapes`;
            defaults from :func:`~deepship.runtimes.engines.tensorrt.dim_range`).
    """
    prof = profile_shapes(onnx_path, ranges)
    return {k: ",".join(f"{name}:{'x'.join(str(d) for d in s[k])}" for name, s in prof.items())
            for k in ("min", "opt", "max")} if prof else {}


def node_placement(sess: Any, feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """How many graph nodes each execution provider ran, from one profiled run.

    ``sess`` must have been created with ``SessionOptions.enable_profiling = True``; this runs it once
    on ``feeds`` (default: zeros at batch 1 with other dynamic dims 8), ends profiling, reads the
    node events' ``provider`` field and deletes the profile file.

    Returns:
        ``{EP name: node count}`` (empty when the profile has no node events).
    """
    if feeds is None:
        feeds = {}
        for i in sess.get_inputs():
            shp = [d if isinstance(d, int) else (1 if n == 0 else 8) for n, d in enumerate(i.shape)]
            dt = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                  "tensor(float16)": np.float16, "tensor(bool)": np.bool_}.get(i.type, np.float32)
            feeds[i.name] = np.zeros(shp, dtype=dt)
    try:
        sess.run(None, dict(feeds))
    finally:
        prof = sess.end_profiling()
    counts: collections.Counter = collections.Counter()
    try:
        events = json.loads(Path(prof).read_text())
        seen = set()
        for e in events:
            if e.get("cat") != "Node":
                continue
            name = str(e.get("name", "")).rsplit("_kernel_time", 1)[0]
            prov = (e.get("args") or {}).get("provider")
            if prov and name not in seen and str(e.get("name", "")).endswith("_kernel_time"):
                seen.add(name)
                counts[prov] += 1
    finally:
        Path(prof).unlink(missing_ok=True)
    return dict(counts)


def create_session(path: str | os.PathLike, requested: Sequence[str], options: Sequence[Mapping[str, str]] | None = None,
                   so: Any = None, strict: bool = False, profile: bool = True,
                   feeds: Mapping[str, np.ndarray] | None = None) -> tuple[Any, ProviderRecord]:
    """Create an ``onnxruntime.InferenceSession`` on ``requested`` EPs and record what ran.

    Args:
        path: the ``.onnx`` model.
        requested: EP names (see :func:`resolve_providers`).
        options: per-EP option dicts aligned with ``requested`` (see :func:`provider_options`).
        so: ``SessionOptions`` to use (a default one otherwise).
        strict: raise instead of falling back; also sets ``session.disable_cpu_ep_fallback`` so
            no node moves silently to the CPU EP when the first EP is not the CPU.
        profile: run once with profiling to fill ``node_placement`` (a fresh session is returned).
        feeds: inputs for the profiled run (default zeros).

    Returns:
        ``(session without profiling, ProviderRecord)``.

    Raises:
        StageError: ``strict`` and the first requested EP did not load or did not run the most nodes
            (names the EP and how to install it); or ONNX Runtime cannot create the session.
    """
    import onnxruntime as ort

    def make(profiling: bool):
        s = so if so is not None else ort.SessionOptions()
        if so is None:
            s.log_severity_level = 3
        s.enable_profiling = profiling
        if profiling:
            s.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"deepship-ep-{os.getpid()}")
        if strict and requested and requested[0] != CPU:
            s.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ONNX Runtime warns for EPs it cannot load: we record that
            return ort.InferenceSession(str(path), s, providers=list(requested),
                                        provider_options=[dict(o) for o in options] if options else None)

    avail = ort.get_available_providers()
    first = requested[0] if requested else CPU
    if strict and first not in avail:
        raise StageError(f"execution provider {first} is not available in this onnxruntime "
                         f"({', '.join(avail)}); {INSTALL_HINT.get(first, 'install the onnxruntime build that has it')}")
    try:
        sess = make(profile)
    except Exception as e:
        msg = first_line(e, 200) or type(e).__name__
        raise StageError(f"ONNX Runtime cannot create a session for {path} on {', '.join(requested)}: {msg}") from None
    loaded = list(sess.get_providers())
    placement: dict[str, int] = {}
    if profile:
        placement = node_placement(sess, feeds)
        so_used = sess.get_session_options()
        del sess
        so_used.enable_profiling = False
        sess = make(False)
    ran = max(placement, key=placement.get) if placement else loaded[0]
    rec = ProviderRecord(list(requested), list(avail), loaded, placement, ran, ran != first)
    if strict and rec.fell_back:
        raise StageError(f"asked for {first} but ONNX Runtime ran the model on {ran} (loaded: {', '.join(loaded)}); "
                         f"{INSTALL_HINT.get(first, 'install the onnxruntime build that has it')}")
    return sess, rec
