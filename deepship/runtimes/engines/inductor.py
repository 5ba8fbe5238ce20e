"""The AOTInductor engine backend: a torch model compiled ahead of time into a ``.pt2`` package.

``torch.export.export`` captures the model with its named dynamic dims (``torch.export.Dim``),
``torch._inductor.aoti_compile_and_package`` compiles it to C++/OpenMP kernels (Triton on CUDA)
and packs the shared library and the weights into ``model.pt2``, which
``torch._inductor.aoti_load_package`` runs without the model's Python code (PyTorch docs,
"AOTInductor: Ahead-Of-Time Compilation for Torch.Export-ed Models").

Precisions:

- ``fp32``: the model as trained.
- ``bf16`` / ``fp16``: weights and compute in the low precision, inputs and outputs stay FP32 (a
  cast wrapper is compiled into the package). BF16 reaches AMX-BF16 tile units on CPUs that have
  them; on CPUs without AVX-512-BF16/AMX it runs in emulation and is slower than FP32.
- ``int8``: PyTorch's PT2E post-training quantization flow (``prepare_pt2e`` -> calibration on real
  training samples -> ``convert_pt2e``) with ``X86InductorQuantizer`` (static, per-channel weights,
  per-tensor activations), compiled with ``freezing`` so Inductor lowers Q/DQ pairs to oneDNN INT8
  convolutions and matmuls (VNNI/AMX-INT8 where the CPU has them). In torch 2.13 the PT2E flow lives
  in ``torchao.quantization.pt2e`` (torchao >= 0.18); ``torch.ao.quantization.quantize_pt2e`` is
  gone. On CPUs without VNNI the activations use a 7-bit range (``reduce_range``), since AVX2's
  ``vpmaddubsw`` saturates 8-bit x 8-bit products.

Every build is checked against the FP32 torch model at two batch sizes (parity stored in
``engine.json``). When the frozen INT8 package disagrees with the eager quantized model (seen with
torch 2.13 on convolution models with a dynamic batch: the frozen package returns the same output for
every input), the backend rebuilds without freezing (Q/DQ kept as element-wise ops, FP32 compute:
correct, not faster) and records that in ``info["warning"]``.

Named dynamic dims stay dynamic where ``torch.export`` can keep them; a dim the model's code
specializes (``nn.LSTM``'s decomposition fixes the sequence length) is exported static at the size
of the model's real data and recorded in ``static_dims``; the batch dim always stays dynamic.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import ArtifactError, InputSpecError, StageError
from ...models.spec import EXAMPLE_DIM_SIZES
from ...utils import default_threads
from ..session import Session
from . import BuildSource, register_backend

PRECISIONS = ("fp32", "bf16", "fp16", "int8")

#: Build-time parity bound per precision: ``max_abs <= atol + rtol * max|FP32 reference|``.
#: INT8 is checked against the eager quantized (PT2E-converted) model, the others against FP32.
PARITY_TOLERANCE = {"fp32": (1e-4, 1e-3), "bf16": (0.0, 0.05), "fp16": (0.0, 0.01), "int8": (0.0, 0.02)}

#: Batch sizes of the build-time parity check (different from the export example batch of 2).
PARITY_BATCHES = (1, 5)


def cpu_has_int8_dot() -> bool:
    """True where the CPU has an 8-bit dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    return bool(fl & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False


def _cast_wrapper(module: Any, dtype: Any):
    """Wrap ``module`` so floating inputs are cast to ``dtype`` and floating outputs back to FP32."""
    import torch

    class _LowPrecision(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *xs):
            xs = tuple(x.to(dtype) if x.is_floating_point() else x for x in xs)
            out = self.inner(*xs)
            if isinstance(out, torch.Tensor):
                return out.float() if out.is_floating_point() else out
            return tuple(o.float() if o.is_floating_point() else o for o in out)

    w = _LowPrecision(module.to(dtype)).eval()
    w._varargs = True  # forward(*xs): torch.export wants the dynamic shapes as one tuple entry
    return w


def _dim_sizes(spec: Any, dataset: Any) -> dict[str, int]:
    """Sizes for the export example: batch 2, other named dims from the real data where there is some."""
    sizes = dict(EXAMPLE_DIM_SIZES)
    if dataset is not None:
        for t in spec.inputs:
            arr = dataset.test.inputs.get(t.name)
            if arr is None:
                continue
            for ax, name in t.dynamic_dims.items():
                if name != "batch" and ax < arr.ndim:
                    sizes[name] = int(arr.shape[ax])
    sizes["batch"] = 2
    return sizes


def _dynamic_shapes(spec: Any, dynamic: Sequence[str], ranges: Mapping[str, tuple[int, int, int]] | None):
    """``dynamic_shapes`` for ``torch.export`` (positional), keeping only the dims named in ``dynamic``."""
    import re

    import torch

    dims: dict[str, Any] = {}
    out = []
    for t in spec.inputs:
        d = {}
        for ax, name in t.dynamic_dims.items():
            if name not in dynamic:
                continue
            if name not in dims:
                lo, _, hi = (ranges or {}).get(name, (1, 0, 2**20))
                dims[name] = torch.export.Dim(re.sub(r"\W", "_", name), min=max(int(lo), 1), max=int(hi))
            d[ax] = dims[name]
        out.append(d or None)
    return tuple(out)


@contextlib.contextmanager
def _quiet():
    """Silence torch.export / Inductor warnings and logs while compiling."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch._inductor", "torch._dynamo", "torch.export", "torchao")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)


def _export(module: Any, args: tuple, spec: Any, ranges: Mapping[str, tuple[int, int, int]] | None):
    """``torch.export.export`` with every named dim dynamic; on a specialization error, only ``batch``.

    Returns ``(ExportedProgram, dynamic dim names, static dim names)``.

    Raises:
        StageError: the model cannot be exported even with only the batch dim dynamic.
    """
    import torch

    names = spec.dynamic_dim_names
    tries = [names] + ([[n for n in names if n == "batch"]] if any(n != "batch" for n in names) else [])
    last: Exception | None = None
    for dyn in tries:
        try:
            with _quiet(), torch.no_grad():
                shapes = _dynamic_shapes(spec, dyn, ranges)
                if getattr(module, "_varargs", False):
                    shapes = (shapes,)
                ep = torch.export.export(module, args, dynamic_shapes=shapes)
            return ep, list(dyn), [n for n in names if n not in dyn]
        except Exception as e:  # torch raises UserError / ConstraintViolationError / many others
            last = e
    first = next((ln.strip() for ln in str(last).splitlines() if ln.strip()), type(last).__name__)[:200]
    raise StageError(f"torch.export could not capture '{spec.name}' for AOTInductor: {first}; "
                     "replace data-dependent Python control flow with tensor ops, or use --backend onnxruntime")


def _run_module(fn: Any, feeds: Mapping[str, np.ndarray], names: Sequence[str], device: str) -> list[np.ndarray]:
    import torch

    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in names]
    with torch.inference_mode():
        out = fn(*args)
    return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in _flat(out)]


def _flat(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


def _parity(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> dict[str, float]:
    a, b = np.asarray(got[0], np.float64), np.asarray(ref[0], np.float64)
    if a.shape != b.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "scale": float(np.abs(b).max())}
    err = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    return {"max_abs": err, "max_rel": err / max(scale, 1e-12), "scale": scale}


def _within(p: Mapping[str, float], precision: str) -> bool:
    atol, rtol = PARITY_TOLERANCE[precision]
    return p["max_abs"] <= atol + rtol * p["scale"]


def _pt2e_int8(module: Any, args: tuple, spec: Any, calibration: Mapping[str, np.ndarray],
               ranges: Mapping[str, tuple[int, int, int]] | None, batch_size: int = 32) -> tuple[Any, dict]:
    """PT2E static INT8: export, ``prepare_pt2e`` with ``X86InductorQuantizer``, calibrate, ``convert_pt2e``.

    Returns ``(converted GraphModule, info)``.

    Raises:
        StageError: torchao (which holds the PT2E flow for torch 2.13) is not installed.
    """
    import torch

    try:
        with _quiet():
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        raise StageError("INT8 AOTInductor needs torchao (PyTorch's PT2E quantization flow): "
                         "pip install torchao==0.18.0") from None
    ep, dyn, static = _export(module, args, spec, ranges)
    reduce_range = not cpu_has_int8_dot()
    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    n = len(next(iter(calibration.values())))
    with _quiet(), torch.no_grad():
        prepared = prepare_pt2e(ep.module(), quantizer)
        for i in range(0, n, batch_size):
            prepared(*(torch.from_numpy(np.ascontiguousarray(calibration[t.name][i:i + batch_size]))
                       for t in spec.inputs))
        converted = convert_pt2e(prepared)
    q = sum(1 for nd in converted.graph.nodes if nd.op == "call_function" and "quantize_per" in str(nd.target)
            and "dequantize" not in str(nd.target))
    return converted, {"quantizer": "torchao X86InductorQuantizer (static, per-channel weights)",
                       "calibration_samples": int(n), "reduce_range": reduce_range,
                       "quantize_nodes": q, "library": "torchao.quantization.pt2e"}


def compile_package(module: Any, spec: Any, out_path: str | Path, precision: str = "fp32", device: str = "cpu",
                    calibration: Mapping[str, np.ndarray] | None = None, dataset: Any = None,
                    ranges: Mapping[str, tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """Compile ``module`` into an AOTInductor package at ``out_path`` and check its parity.

    Args:
        module: FP32 ``nn.Module`` (eval mode) taking ``spec.inputs`` positionally.
        spec: the model's :class:`~deepship.models.spec.ModelSpec` (input names, dtypes, named dims).
        out_path: destination ``.pt2`` file (the caller writes into a temporary folder).
        precision: ``fp32``, ``bf16``, ``fp16`` or ``int8`` (PT2E, needs ``calibration``).
        device: ``"cpu"`` or ``"cuda"``.
        calibration: ``{input: array (N, ...)}`` real training samples for INT8.
        dataset: the model's dataset (sizes of non-batch dims when they must be static), or ``None``.
        ranges: optional ``{dim name: (min, opt, max)}`` bounds of the dynamic dims.

    Returns:
        info dict: ``dynamic_dims``, ``static_dims`` (name -> size), ``build_parity`` (per batch size,
        ``max_abs``/``max_rel`` against the FP32 torch model), ``compile_s``, ``device``, ``precision``,
        ``inductor_configs``, ``lowering``, and for INT8 ``int8`` (quantizer, calibration, reduce_range).

    Raises:
        StageError: unknown precision, export failure, INT8 without calibration data or torchao, or a
            package whose outputs miss the precision's parity bound.
    """
    import torch

    if precision not in PRECISIONS:
        raise StageError(f"AOTInductor builds {', '.join(PRECISIONS)}; got '{precision}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("AOTInductor --device cuda needs a CUDA GPU and a CUDA build of torch; this machine has none")
    t0 = time.perf_counter()
    out_path = Path(out_path)
    module = module.eval().float()
    names = [t.name for t in spec.inputs]
    sizes = _dim_sizes(spec, dataset)
    ex = spec.example_inputs(sizes)
    args = tuple(torch.from_numpy(ex[n]).to(device) for n in names)
    info: dict[str, Any] = {"device": device, "precision": precision, "torch": torch.__version__}
    ref_module = module if device == "cpu" else _clone(module).to(device)
    configs: dict[str, Any] = {}
    check_against = ref_module
    if precision == "int8":
        if device != "cpu":
            raise StageError("INT8 AOTInductor uses X86InductorQuantizer, a CPU flow; build INT8 for CUDA with "
                             "--backend tensorrt")
        if calibration is None:
            raise StageError("INT8 AOTInductor needs calibration samples; give the model real data (--data)")
        converted, info["int8"] = _pt2e_int8(module, args, spec, calibration, ranges)
        check_against = converted
        model_to_export = converted
        configs = {"freezing": True}
    elif precision in ("bf16", "fp16"):
        model_to_export = _cast_wrapper(_clone(ref_module), getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision]))
    else:
        model_to_export = ref_module
    ep, dyn, static = _export(model_to_export, args, spec, ranges)
    info["dynamic_dims"] = dyn
    info["static_dims"] = {n: sizes[n] for n in static}
    feeds = {b: spec.example_inputs({**sizes, "batch": b}, seed=5 + b) for b in PARITY_BATCHES}
    if calibration is not None:  # real samples are the better parity probe
        for b in PARITY_BATCHES:
            if all(len(calibration[n]) >= b and calibration[n].shape[1:] == feeds[b][n].shape[1:] for n in names):
                feeds[b] = {n: np.ascontiguousarray(calibration[n][:b]) for n in names}
    refs = {b: _run_module(ref_module, f, names, device) for b, f in feeds.items()}
    checks = {b: _run_module(check_against, f, names, device) for b, f in feeds.items()} \
        if check_against is not ref_module else refs

    def build(cfg: dict) -> dict[int, dict]:
        with _quiet(), torch.no_grad():
            torch._inductor.aoti_compile_and_package(ep, package_path=str(out_path), inductor_configs=dict(cfg))
        runner = torch._inductor.aoti_load_package(str(out_path))
        try:
            got = {b: _run_module(runner, f, names, device) for b, f in feeds.items()}
        except Exception as e:  # a kernel the CPU lacks (oneDNN has no BF16 LSTM on AVX2), ...
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:160]
            raise StageError(f"the {precision} AOTInductor package of '{spec.name}' fails to run on this "
                             f"{device}: {first}; use --precision fp32 or --backend onnxruntime") from None
        return {b: (_parity(got[b], refs[b]), _parity(got[b], checks[b])) for b in feeds}

    res = build(configs)
    info["lowering"] = "oneDNN INT8 kernels (freezing)" if precision == "int8" else "Inductor C++/OpenMP" \
        if device == "cpu" else "Inductor Triton"
    if precision == "int8" and not all(_within(c, "int8") for _, c in res.values()):
        info["warning"] = ("the frozen INT8 package disagreed with the eager quantized model (a torch 2.13 "
                           "AOTInductor issue with a dynamic batch); built it without freezing: Q/DQ as "
                           "element-wise ops, FP32 compute, correct but not faster")
        configs = {}
        info["lowering"] = "reference (Q/DQ element-wise, FP32 compute)"
        out_path.unlink(missing_ok=True)
        res = build(configs)
    info["inductor_configs"] = configs
    info["build_parity"] = {f"batch{b}": {k: v for k, v in p.items() if k != "scale"} for b, (p, _) in res.items()}
    if precision == "int8":
        info["build_parity_vs_eager_int8"] = {f"batch{b}": {k: v for k, v in c.items() if k != "scale"}
                                              for b, (_, c) in res.items()}
    bad = [(b, c) for b, (_, c) in res.items() if not _within(c, precision)]
    if bad:
        b, c = bad[0]
        atol, rtol = PARITY_TOLERANCE[precision]
        raise StageError(f"the {precision} AOTInductor package of '{spec.name}' misses parity at batch {b}: max abs "
                         f"{c['max_abs']:.3g} > {atol:g} + {rtol:g} x {c['scale']:.3g}; use --backend onnxruntime")
    info["compile_s"] = round(time.perf_counter() - t0, 2)
    return info


def _clone(module: Any) -> Any:
    import copy

    return copy.deepcopy(module)


class InductorSession(Session):
    """Runs an AOTInductor ``.pt2`` package (``torch._inductor.aoti_load_package``).

    Args:
        path: the ``.pt2`` package.
        input_names, output_names: names for the feed and result dicts (inputs are passed positionally).
        device: ``"cpu"`` or ``"cuda"`` (what the package was compiled for).
        static_dims: ``{input: {axis: size}}`` that the package fixed; other sizes raise InputSpecError.
        threads: intra-op (OpenMP) threads.

    Inputs: numpy arrays of the spec's dtypes, e.g. float32 ``(batch, 1, 8, 8)``; outputs float32 numpy.

    Raises:
        ArtifactError: the package is missing or cannot be loaded (compiled for another torch or device).
    """

    runtime = "inductor"

    def __init__(self, path: str | Path, input_names: Sequence[str], output_names: Sequence[str],
                 device: str = "cpu", static_dims: Mapping[str, Mapping[int, int]] | None = None,
                 threads: int | None = None):
        import torch

        p = Path(path)
        if not p.is_file():
            raise ArtifactError(f"AOTInductor package {p} not found; rebuild it with optimize engine --backend inductor")
        if device == "cuda" and not torch.cuda.is_available():
            raise ArtifactError(f"{p.name} was compiled for CUDA and this machine has no CUDA GPU; rebuild it here "
                                "(optimize engine --backend inductor) or run it on the GPU machine")
        self.threads = threads or default_threads()
        torch.set_num_threads(self.threads)
        try:
            with _quiet():
                self.runner = torch._inductor.aoti_load_package(str(p))
        except Exception as e:
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]
            raise ArtifactError(f"cannot load AOTInductor package {p}: {first}; rebuild it with this torch "
                                f"({torch.__version__})") from None
        self.torch = torch
        self.path = str(p)
        self.device = device
        self.provider = device
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.static_dims = {k: {int(a): int(s) for a, s in v.items()} for k, v in (static_dims or {}).items()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = []
        for n in self.input_names:
            if n not in feeds:
                raise InputSpecError(f"missing input '{n}'; the model takes {', '.join(self.input_names)}")
            a = np.asarray(feeds[n])
            for ax, size in self.static_dims.get(n, {}).items():
                if ax < a.ndim and a.shape[ax] != size:
                    raise InputSpecError(f"input '{n}' has size {a.shape[ax]} at axis {ax}, but this AOTInductor "
                                         f"package was compiled for {size} there (torch.export fixed that dim); "
                                         "use the ONNX or ONNX Runtime engine variant for other sizes")
            args.append(torch.from_numpy(np.ascontiguousarray(a)).to(self.device))
        try:
            with torch.inference_mode():
                out = self.runner(*args)
        except Exception as e:
            shapes = ", ".join(f"{n}{list(x.shape)}:{x.dtype}" for n, x in zip(self.input_names, args))
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:160]
            raise InputSpecError(f"the AOTInductor package rejected inputs {shapes}: {first}") from None
        return {name: (o.float() if o.is_floating_point() else o).cpu().numpy()
                for name, o in zip(self.output_names, _flat(out))}


class InductorBackend:
    """``optimize engine --backend inductor``: torch variant -> AOTInductor ``.pt2`` package.

    Artifact files: ``model.pt2`` and ``engine.json`` (precision, device, input/output names and dtypes,
    dynamic and static dims, parity, torch version). Compilation needs a C++ compiler (g++ or clang++)
    and takes tens of seconds per model on 2 cores; the cache reuses built packages.
    """

    name = "inductor"
    consumes = "torch"
    precisions = PRECISIONS

    def available(self) -> tuple[bool, str]:
        import torch

        if not hasattr(torch._inductor, "aoti_compile_and_package"):
            return False, f"torch {torch.__version__} has no AOTInductor packaging; install torch>=2.6"
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return False, "AOTInductor needs a C++ compiler: apt-get install -y g++"
        return True, ""

    def build(self, source: BuildSource, out_dir: Path, precision: str, params: dict) -> tuple[list[str], dict]:
        """Compile the torch module of ``source`` into ``out_dir/model.pt2`` (+ ``engine.json``).

        ``params``: ``device`` (default ``cuda`` when a GPU is present, else ``cpu``), ``shapes``
        (``{dim: (min, opt, max)}``). INT8 calibrates on ``source.calibration()``.

        Raises:
            StageError: no torch module in ``source``, INT8 without calibration data, or any
                :func:`compile_package` error.
        """
        import torch

        if source.module is None:
            raise StageError("the inductor backend compiles a torch model; start from the torch variant")
        device = params.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        module = source.module
        calib = None
        calib_desc = None
        if precision == "int8":
            if source.calibration is None:
                raise StageError("INT8 AOTInductor needs calibration samples; build it through the engine stage")
            calib, calib_desc = source.calibration()
        ranges = {k: tuple(v) for k, v in (params.get("shapes") or {}).items()}
        spec = source.spec
        info = compile_package(module, spec, out_dir / "model.pt2", precision, device, calibration=calib,
                               dataset=source.dataset, ranges=ranges or None)
        if calib_desc:
            info["calibration_data"] = calib_desc
        static = {t.name: {ax: info["static_dims"][n] for ax, n in t.dynamic_dims.items() if n in info["static_dims"]}
                  for t in spec.inputs}
        meta = {"backend": "inductor", "precision": precision, "device": device, "torch": torch.__version__,
                "inputs": [t.describe() for t in spec.inputs], "input_names": [t.name for t in spec.inputs],
                "output_names": list(spec.output_names), "dynamic_dims": info["dynamic_dims"],
                "static_dims": {k: v for k, v in static.items() if v}, "parity": info["build_parity"],
                "inductor_configs": info["inductor_configs"]}
        (out_dir / "engine.json").write_text(json.dumps(meta, indent=2))
        info["providers"] = [device]
        return ["model.pt2", "engine.json"], info

    def session(self, variant: Any, threads: int | None = None) -> InductorSession:
        meta_p = Path(variant.dir) / "engine.json"
        if not meta_p.is_file():
            raise ArtifactError(f"{meta_p} is missing; rebuild the engine with optimize engine --backend inductor")
        meta = json.loads(meta_p.read_text())
        return InductorSession(Path(variant.dir) / "model.pt2", meta["input_names"], meta["output_names"],
                               device=meta.get("device", "cpu"), static_dims=meta.get("static_dims"), threads=threads)


register_backend(InductorBackend())
