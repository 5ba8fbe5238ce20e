"""The TensorRT engine backend: ONNX -> serialized TensorRT engine (plan) + build metadata.

Written against TensorRT's documented Python API (TensorRT 10 "Python API" and "Developer Guide";
TensorRT for RTX 1.x keeps the same builder/parser/runtime classes):

- ``trt.Builder`` -> ``create_network`` -> ``trt.OnnxParser.parse_from_file``; parser errors are
  surfaced per node (``ParserError.node_name()``, ``node_operator()``, ``desc()``);
- ``IBuilderConfig`` with ``BuilderFlag.FP16`` / ``BuilderFlag.INT8``. INT8 comes either from an
  explicit QDQ model (default: deepship's static QDQ quantizer run with symmetric INT8 activations,
  the only kind TensorRT accepts, and the INT32 bias DequantizeLinear nodes folded to FP32 constants,
  which TensorRT's parser rejects) or, with ``calibration="entropy-calibrator"``, from an
  ``IInt8EntropyCalibrator2`` over the calibration set (implicit quantization; deprecated in TensorRT
  10, needs a GPU and the full TensorRT);
- one optimization profile per build, its min/opt/max taken from the model's *named* dynamic dims
  (``--shapes batch=1/32/256,seq=1/24/128``; defaults in :data:`DEFAULT_RANGES`);
- a timing cache persisted under ``$DEEPSHIP_CACHE/tensorrt/`` and reused by later builds;
- the engine written as ``model.engine`` with ``engine.json`` (TensorRT version and library, GPU and
  compute capability, precision, profiles, I/O names/dtypes, timing-cache use).

Two libraries are accepted: NVIDIA's full ``tensorrt`` (GPU machines; not on the public package
registries here) and ``tensorrt_rtx`` (TensorRT for RTX, ``pip install tensorrt-rtx-cu13``, about
95 MB): its builder and ONNX parser run without a GPU, so the build path runs in CI on a CPU machine.
TensorRT-RTX networks are strongly typed (precision comes from the ONNX model: FP16 needs the FP16
ONNX variant; there are no FP16/INT8 builder flags nor calibrators), its timing-cache calls are
no-ops, and its engines run on RTX-class GPUs (Turing to Blackwell consumer/workstation parts and
SM80; not SM90 H100/H200).

Running an engine needs CUDA: :class:`TensorRTSession` checks for a CUDA device *before* creating a
``trt.Runtime`` (a failed Runtime creation on a machine without a GPU returns an object that later
crashes the process). Device buffers are CUDA tensors from torch.
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import ArtifactError, InputSpecError, StageError
from ...models.user import onnx_spec
from ...utils import atomic_file, cache_root
from ..session import Session
from . import BuildSource, register_backend

PRECISIONS = ("fp32", "fp16", "int8")

#: Optimization-profile ``(min, opt, max)`` per named dim when ``--shapes`` does not give one.
#: The batch max covers the report's evaluation batches (256 samples per call).
DEFAULT_RANGES: dict[str, tuple[int, int, int]] = {"batch": (1, 32, 256)}
OTHER_DIM_RANGE = (1, 32, 512)
WORKSPACE_BYTES = 1 << 30

INSTALL_HINT = ("TensorRT is not installed: pip install 'deepship[tensorrt-rtx]' (TensorRT for RTX, about 95 MB: "
                "its builder runs without a GPU; engines run on RTX-class GPUs), or on an NVIDIA data-centre GPU "
                "machine install NVIDIA's tensorrt wheels from NVIDIA's own package index")


# ---- shapes -------------------------------------------------------------------------------------

def parse_shapes(text: str | None) -> dict[str, tuple[int, int, int]]:
    """Parse ``--shapes``: ``MIN/OPT/MAX`` (the batch dim) or ``DIM=MIN/OPT/MAX,DIM=...``.

    Example: ``1/32/256`` or ``batch=1/32/256,seq=1/24/128``.

    Raises:
        InputSpecError: not that notation, or not ``1 <= min <= opt <= max``.
    """
    if not text:
        return {}
    out: dict[str, tuple[int, int, int]] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, rng = part.rpartition("=")
        name = name.strip() or "batch"
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*/\s*(\d+)\s*", rng)
        if not m or not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise InputSpecError(f"cannot parse --shapes '{text}'; write MIN/OPT/MAX for the batch dim or "
                                 "DIM=MIN/OPT/MAX,... e.g. batch=1/32/256,seq=1/24/128")
        lo, opt, hi = (int(x) for x in m.groups())
        if not 1 <= lo <= opt <= hi:
            raise InputSpecError(f"--shapes {name}={lo}/{opt}/{hi} must satisfy 1 <= min <= opt <= max")
        out[name] = (lo, opt, hi)
    return out


def dim_range(name: str, ranges: Mapping[str, Sequence[int]] | None = None) -> tuple[int, int, int]:
    """``(min, opt, max)`` of the named dim: from ``ranges``, else :data:`DEFAULT_RANGES`, else (1, 32, 512)."""
    r = (ranges or {}).get(name) or DEFAULT_RANGES.get(name) or OTHER_DIM_RANGE
    return tuple(int(x) for x in r)  # type: ignore[return-value]


def profile_shapes(path: str | Path, ranges: Mapping[str, Sequence[int]] | None = None) -> dict[str, dict[str, list[int]]]:
    """``{input: {"min": [...], "opt": [...], "max": [...]}}`` for the inputs with dynamic dims."""
    out = {}
    for t in onnx_spec(str(path)).inputs:
        name, dims = t.name, list(t.dims)
        if all(isinstance(d, int) for d in dims):
            continue
        out[name] = {k: [d if isinstance(d, int) else dim_range(d, ranges)[i] for d in dims]
                     for i, k in enumerate(("min", "opt", "max"))}
    return out


# ---- the library ---------------------------------------------------------------------------------

def import_tensorrt() -> tuple[Any, str]:
    """``(module, "tensorrt" | "tensorrt_rtx")``, or ``(None, "")`` when neither imports."""
    try:
        import tensorrt as trt  # NVIDIA's full TensorRT

        if hasattr(trt, "Builder"):
            return trt, "tensorrt"
    except Exception:  # placeholder wheels raise at import
        pass
    try:
        import tensorrt_rtx as trt

        return trt, "tensorrt_rtx"
    except Exception:
        return None, ""


def cuda_device() -> dict[str, Any] | None:
    """``{"name", "compute_capability"}`` of CUDA device 0, or ``None`` (checked through torch)."""
    try:
        import torch

        if torch.cuda.is_available():
            cc = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{cc[0]}.{cc[1]}"}
    except Exception:
        pass
    return None


def _logger(trt: Any):
    """A ``trt.ILogger`` that keeps warnings and errors (for one-line error messages)."""

    class _Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append((severity, str(msg)))

        def errors(self) -> list[str]:
            return [m for s, m in self.messages if s <= trt.ILogger.Severity.ERROR]

    return _Capture()


# ---- INT8 QDQ for TensorRT -----------------------------------------------------------------------

def fold_bias_dequantize(model: Any) -> int:
    """Replace ``DequantizeLinear`` nodes fed by INT32 initializers (quantized biases) by FP32 constants.

    TensorRT accepts only 8-bit (and FP8/4-bit) inputs to DequantizeLinear; ONNX Runtime's quantizer
    stores biases as INT32 + scale. The FP32 value is ``(q - zero_point) * scale``. Edits in place.

    Returns:
        The number of nodes folded.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    folded = 0
    keep = []
    for node in model.graph.node:
        x = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if x is None or x.data_type != 6:  # 6 = INT32
            keep.append(node)
            continue
        q = numpy_helper.to_array(x).astype(np.float64)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
        model.graph.initializer.append(numpy_helper.from_array(((q - zp) * scale).astype(np.float32), node.output[0]))
        folded += 1
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for i in unused:
        model.graph.initializer.remove(i)
    return folded


#: how the engine stage makes TensorRT's INT8 QDQ source: ONNX Runtime static QDQ, symmetric INT8
#: activations (zero point 0, what TensorRT's explicit quantization takes), per-channel weights
qdq_recipe = {"per_channel": True, "symmetric_activations": True}


def _entropy_calibrator(trt: Any, calibration: Mapping[str, np.ndarray], input_names: Sequence[str],
                        cache_path: Path, batch_size: int = 32):
    """An ``IInt8EntropyCalibrator2`` over the calibration samples (device buffers via torch CUDA tensors)."""
    import torch

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.i = 0
            self.n = len(next(iter(calibration.values())))
            self.buffers: dict[str, Any] = {}

        def get_batch_size(self):
            return batch_size

        def get_batch(self, names):
            if self.i >= self.n:
                return None
            ptrs = []
            for name in names:
                t = torch.from_numpy(np.ascontiguousarray(calibration[name][self.i:self.i + batch_size])).cuda()
                self.buffers[name] = t
                ptrs.append(int(t.data_ptr()))
            self.i += batch_size
            return ptrs

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache):
            with atomic_file(cache_path) as tmp:
                tmp.write_bytes(bytes(cache))

    return _Calibrator()


# ---- build ---------------------------------------------------------------------------------------

def _timing_cache_path(version: str, device: dict[str, Any] | None) -> Path:
    gpu = re.sub(r"\W+", "-", device["name"]).strip("-").lower() if device else "no-gpu"
    return cache_root() / "tensorrt" / f"timing-{version}-{gpu}.cache"


def build_engine(onnx_path: str | Path, out_dir: str | Path, precision: str = "fp32",
                 ranges: Mapping[str, Sequence[int]] | None = None, calibrator: Any = None,
                 trt: Any = None, flavour: str = "") -> dict[str, Any]:
    """Parse ``onnx_path``, build and serialize a TensorRT engine into ``out_dir/model.engine``.

    Args:
        onnx_path: the ONNX model (FP32, FP16, or explicit INT8 QDQ).
        out_dir: destination folder (the caller builds into a temporary folder and renames it).
        precision: ``fp32``, ``fp16`` (``BuilderFlag.FP16`` on full TensorRT) or ``int8``
            (``BuilderFlag.INT8``: QDQ scales, or ``calibrator``'s ranges).
        ranges: ``{dim name: (min, opt, max)}`` for the optimization profile.
        calibrator: an ``IInt8Calibrator`` (full TensorRT only) for implicit INT8.
        trt, flavour: the module from :func:`import_tensorrt` (imported when ``None``).

    Returns:
        metadata (also written to ``out_dir/engine.json``): library, TensorRT version, GPU, precision,
        profiles, I/O, timing-cache use, build seconds, engine bytes.

    Raises:
        StageError: TensorRT missing (with the install line), parser errors (per node), a precision
            the library cannot build, or a failed build (TensorRT's first error).
    """
    if trt is None:
        trt, flavour = import_tensorrt()
    if trt is None:
        raise StageError(INSTALL_HINT)
    if precision not in PRECISIONS:
        raise StageError(f"the tensorrt engine builds {', '.join(PRECISIONS)}; got '{precision}'")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    t0 = time.perf_counter()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            desc = next((ln.strip() for ln in str(e.desc()).splitlines() if ln.strip()), "")[:160]
            errs.append(f"node '{e.node_name() or e.node()}' ({e.node_operator() or '?'}): {desc}")
        raise StageError(f"TensorRT's ONNX parser rejected {len(errs)} node(s) of {onnx_path.name}: "
                         + "; ".join(errs[:3]) + ("; ..." if len(errs) > 3 else ""))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    strongly_typed = flavour == "tensorrt_rtx"
    if precision == "fp16":
        if strongly_typed:
            if not _has_fp16_tensors(network, trt):
                raise StageError("TensorRT-RTX builds strongly typed networks: FP16 comes from the ONNX model; "
                                 "build from the FP16 variant (optimize quantize --method fp16)")
        else:
            config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if calibrator is not None:
            if strongly_typed or not hasattr(trt, "IInt8EntropyCalibrator2"):
                raise StageError("INT8 calibration inside TensorRT needs the full TensorRT on a GPU; TensorRT-RTX "
                                 "takes INT8 from an explicit QDQ model (the default --calibration qdq)")
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = calibrator
        elif not strongly_typed:
            config.set_flag(trt.BuilderFlag.INT8)
    profiles = profile_shapes(onnx_path, ranges)
    if profiles:
        prof = builder.create_optimization_profile()
        for name, s in profiles.items():
            prof.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(prof)
        if calibrator is not None and hasattr(config, "set_calibration_profile"):
            config.set_calibration_profile(prof)
    device = cuda_device()
    version = str(trt.__version__)
    timing: dict[str, Any] = {"used": False}
    cache = None
    if strongly_typed:
        timing["note"] = "TensorRT-RTX tunes kernels at run time; its timing-cache calls are no-ops"
    else:
        tpath = _timing_cache_path(version, device)
        data = tpath.read_bytes() if tpath.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
        timing = {"used": True, "path": str(tpath), "reused": bool(data), "bytes_before": len(data)}
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errs = logger.errors()
        raise StageError(f"TensorRT could not build an engine from {onnx_path.name}: "
                         f"{errs[-1][:200] if errs else 'no error message'}")
    if cache is not None:
        blob = bytes(config.get_timing_cache().serialize())
        tpath = Path(timing["path"])
        tpath.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(tpath) as tmp:
            tmp.write_bytes(blob)
        timing["bytes_after"] = len(blob)
    engine_bytes = bytes(serialized)
    (out_dir / "model.engine").write_bytes(engine_bytes)
    io_ = {"inputs": [], "outputs": []}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io_["inputs"].append({"name": t.name, "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io_["outputs"].append({"name": t.name, "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)})
    meta = {
        "backend": "tensorrt", "library": flavour, "tensorrt": version, "precision": precision,
        "gpu": device, "built_without_gpu": device is None,
        "targets": ("RTX-class GPUs (TensorRT-RTX: no SM90)" if strongly_typed else
                    (f"the build GPU ({device['name']}, SM {device['compute_capability']})" if device else "unknown")),
        "strongly_typed": strongly_typed, "int8_source": ("calibrator" if calibrator is not None else "qdq")
        if precision == "int8" else None,
        "profiles": profiles, "layers": int(network.num_layers), **io_, "timing_cache": timing,
        "engine_bytes": len(engine_bytes), "build_s": round(time.perf_counter() - t0, 2),
        "warnings": [m[:200] for _, m in logger.messages][:10],
    }
    (out_dir / "engine.json").write_text(json.dumps(meta, indent=2))
    return meta


def _has_fp16_tensors(network: Any, trt: Any) -> bool:
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.DataType.HALF:
                return True
    return False


# ---- session -------------------------------------------------------------------------------------

_TRT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "BOOL": "bool", "UINT8": "uint8"}


class TensorRTSession(Session):
    """Runs a serialized TensorRT engine on CUDA device 0 with device buffers.

    Inputs are copied into CUDA tensors (reused while their size fits), ``set_input_shape`` and
    ``set_tensor_address`` bind them, ``execute_async_v3`` runs on a CUDA stream, outputs are copied
    back. Inputs: numpy arrays matching the engine's input dtypes, shapes within its profile.

    Args:
        engine_path: ``model.engine``.
        meta: the engine's ``engine.json`` (library and version checked against the installed one).

    Raises:
        ArtifactError: no CUDA GPU (checked before any TensorRT runtime object exists), TensorRT missing
            or of another version than the engine's, or an engine that does not deserialize.
    """

    runtime = "tensorrt"

    def __init__(self, engine_path: str | Path, meta: Mapping[str, Any], threads: int | None = None):
        dev = cuda_device()
        if dev is None:
            raise ArtifactError("running a TensorRT engine needs an NVIDIA GPU with CUDA and a CUDA build of torch; "
                                "this machine has none: build here, run on the GPU machine, or use --backend "
                                "onnxruntime or inductor")
        trt, flavour = import_tensorrt()
        if trt is None:
            raise ArtifactError(INSTALL_HINT)
        if flavour != meta.get("library") or str(trt.__version__) != meta.get("tensorrt"):
            raise ArtifactError(f"{engine_path} was built with {meta.get('library')} {meta.get('tensorrt')} but "
                                f"{flavour} {trt.__version__} is installed; rebuild the engine")
        import torch

        self.torch = torch
        self.trt = trt
        self.logger = _logger(trt)
        self.runtime_obj = trt.Runtime(self.logger)
        self.engine = self.runtime_obj.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            errs = self.logger.errors()
            raise ArtifactError(f"TensorRT cannot deserialize {engine_path} on {dev['name']}: "
                                f"{errs[-1][:200] if errs else 'unknown error'}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: getattr(torch, _TRT_TO_TORCH.get(str(self.engine.get_tensor_dtype(n)).split(".")[-1],
                                                            "float32")) for n in names}
        self.buffers: dict[str, Any] = {}
        self.provider = f"cuda:{dev['name']}"
        self.threads = 1

    def _buffer(self, name: str, shape: Sequence[int]):
        numel = int(np.prod(shape)) if len(shape) else 1
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.torch.empty(max(numel, 1), dtype=self.dtypes[name], device="cuda")
            self.buffers[name] = buf
        return buf[:numel].view(*shape) if len(shape) else buf[:1].view(())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self.stream):
            for n in self.input_names:
                if n not in feeds:
                    raise InputSpecError(f"missing input '{n}'; the engine takes {', '.join(self.input_names)}")
                a = np.ascontiguousarray(feeds[n])
                dst = self._buffer(n, a.shape)
                dst.copy_(torch.from_numpy(a).to(self.dtypes[n]), non_blocking=False)
                if not self.context.set_input_shape(n, tuple(a.shape)):
                    raise InputSpecError(f"input '{n}' shape {tuple(a.shape)} is outside the engine's optimization "
                                         "profile; rebuild with --shapes covering it")
                self.context.set_tensor_address(n, int(dst.data_ptr()))
            outs = {}
            for n in self.output_names:
                shape = tuple(self.context.get_tensor_shape(n))
                outs[n] = self._buffer(n, shape)
                self.context.set_tensor_address(n, int(outs[n].data_ptr()))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ArtifactError("TensorRT execution failed: " + "; ".join(self.logger.errors()[-1:]))
        self.stream.synchronize()
        return {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in outs.items()}


# ---- backend -------------------------------------------------------------------------------------

class TensorRTBackend:
    """``optimize engine --backend tensorrt --precision fp32|fp16|int8 [--shapes ...]``.

    Params: ``shapes`` (``{dim: (min, opt, max)}``), ``calibration`` (``qdq`` default, or
    ``entropy-calibrator``), ``samples`` (calibration samples, default 256).
    Artifact files: ``model.engine`` and ``engine.json``.
    """

    name = "tensorrt"
    consumes = "onnx"
    precisions = PRECISIONS

    def available(self) -> tuple[bool, str]:
        trt, _ = import_tensorrt()
        return (True, "") if trt is not None else (False, INSTALL_HINT)

    def build(self, source: BuildSource, out_dir: Path, precision: str, params: dict) -> tuple[list[str], dict]:
        """Build ``model.engine`` and ``engine.json`` from the ONNX file of ``source``.

        INT8 takes either a QDQ source (``source.precision == "int8"``; its INT32 bias dequantizations
        are folded, :func:`fold_bias_dequantize`; the engine stage makes one with :func:`qdq_recipe`),
        or an FP32 source with ``params["calibration"] == "entropy-calibrator"`` and
        ``source.calibration``.

        Raises:
            StageError: TensorRT missing (with the install line), an unknown precision or calibration
                mode, INT8 from FP32 without calibration data, or a build error (per-node parser errors).
        """
        parent = source
        trt, flavour = import_tensorrt()
        if trt is None:
            raise StageError(INSTALL_HINT)
        if precision not in PRECISIONS:
            raise StageError(f"the tensorrt engine builds {', '.join(PRECISIONS)}; got '{precision}'")
        ranges = {k: tuple(v) for k, v in (params.get("shapes") or {}).items()}
        mode = params.get("calibration", "qdq")
        if mode not in ("qdq", "entropy-calibrator"):
            raise StageError(f"unknown TensorRT INT8 calibration '{mode}'; use qdq or entropy-calibrator")
        info: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as td:
            src = Path(parent.path)
            calibrator = None
            if precision == "int8" and parent.precision == "fp32":
                if source.calibration is None or mode != "entropy-calibrator":
                    raise StageError("INT8 TensorRT from an FP32 model needs a QDQ source (calibration qdq) or "
                                     "calibration samples (calibration entropy-calibrator)")
                calib, desc = source.calibration()
                info["calibration_data"] = desc
                calibrator = _entropy_calibrator(trt, calib, [t.name for t in source.spec.inputs],
                                                 cache_root() / "tensorrt" / f"calib-{source.key}.cache")
            elif parent.precision == "int8":  # a QDQ variant given as source: fold its INT32 biases
                import onnx

                m = onnx.load(str(parent.path))
                info["bias_dq_folded"] = fold_bias_dequantize(m)
                src = Path(td) / "model.qdq.onnx"
                onnx.save_model(m, str(src))
            meta = build_engine(src, out_dir, precision, ranges, calibrator=calibrator, trt=trt, flavour=flavour)
        info.update({k: meta[k] for k in ("library", "tensorrt", "gpu", "targets", "profiles", "timing_cache",
                                          "build_s", "engine_bytes", "int8_source")})
        info["precision"] = precision
        info["provider"] = f"{flavour} on an NVIDIA GPU ({meta['targets']})"
        info["providers"] = [flavour]
        return ["model.engine", "engine.json"], info

    def session(self, variant: Any, threads: int | None = None) -> TensorRTSession:
        meta_p = Path(variant.dir) / "engine.json"
        if not meta_p.is_file():
            raise ArtifactError(f"{meta_p} is missing; rebuild the engine with optimize engine --backend tensorrt")
        plan = variant.path if variant.files else Path(variant.dir) / "model.engine"  # model.plan in a Triton repository
        return TensorRTSession(plan, json.loads(meta_p.read_text()), threads=threads)


register_backend(TensorRTBackend())
