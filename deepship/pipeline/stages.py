"""The stages behind one registry, and the per-model context that builds variants through the cache.

A stage implementation is registered for a ``(stage, method)`` pair and declares the format it
consumes and the one it produces (the Olive "pass" idea: each pass registers itself and declares
its configuration). :func:`check_chain` uses those declarations to reject an impossible chain
before anything runs.

| stage | method | consumes -> produces |
|---|---|---|
| export | onnx | torch -> onnx |
| quantize | int8-dynamic, int8-static, fp16, int4-weight-only | onnx -> onnx |
| quantize | bf16 | torch -> torch |
| engine | onnxruntime | onnx -> engine:onnxruntime |
| engine | inductor | torch -> engine:inductor |
| engine | tensorrt | onnx -> engine:tensorrt |
| prune | structured, unstructured | torch -> torch (:mod:`deepship.pipeline.prune`) |
| distill | kd | torch -> torch (:mod:`deepship.pipeline.distill`) |
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import StageError, WeightsError
from ..models.spec import ModelSpec
from ..utils import atomic_dir, sha256_file
from .variants import Variant, artifact_dir, baseline_key, library_versions, load_cached, variant_key, write_meta

CALIBRATION_SAMPLES = 256


@dataclass
class StageImpl:
    """One registered stage implementation.

    ``fn(ctx, parent, params, out_dir) -> (file names, info)`` builds into ``out_dir``.
    ``uses_data``: the stage reads the model's data (calibration, fine-tuning, distillation), so the
    data's identity is part of its cache key.
    """

    stage: str
    method: str
    consumes: str
    produces: str
    precision: str
    fn: Callable[..., tuple[list[str], dict]]
    doc: str = ""
    uses_data: bool = False


_STAGES: dict[tuple[str, str], StageImpl] = {}


def register_stage(stage: str, method: str, consumes: str, produces: str, precision: str = "fp32",
                   uses_data: bool = False):
    """Decorator registering ``fn`` as the implementation of ``(stage, method)``; ``uses_data`` for
    stages that read the model's data (their cache key then covers it)."""

    def deco(fn):
        _STAGES[(stage, method)] = StageImpl(stage, method, consumes, produces, precision, fn,
                                             (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
                                             uses_data)
        return fn

    return deco


def get_stage(stage: str, method: str) -> StageImpl:
    """Raises :class:`StageError` for an unknown pair, listing the known methods of ``stage``."""
    if (stage, method) not in _STAGES:
        known = sorted(m for s, m in _STAGES if s == stage)
        if not known:
            raise StageError(f"unknown stage '{stage}'; stages are {', '.join(sorted({s for s, _ in _STAGES}))}")
        raise StageError(f"unknown {stage} method '{method}'; use one of {', '.join(known)}")
    return _STAGES[(stage, method)]


def stages() -> list[StageImpl]:
    return list(_STAGES.values())


def check_chain(start_format: str, chain: Sequence[tuple[str, str]]) -> str:
    """Check that ``chain`` of ``(stage, method)`` can run from ``start_format``; return the end format.

    Raises:
        StageError: naming the first step whose input format does not match.
    """
    fmt = start_format
    for stage, method in chain:
        impl = get_stage(stage, method)
        if impl.consumes != fmt:
            raise StageError(f"{stage} {method} consumes a {impl.consumes} model but gets {fmt}; "
                             + ("export to ONNX first" if impl.consumes == "onnx" else "start from the torch model"))
        fmt = impl.produces
    return fmt


class ModelContext:
    """Everything needed to build and run one model's variants.

    Args:
        spec: the resolved :class:`ModelSpec`.
        retrain: ignore committed/cached weights and run the training recipe.
        progress: optional ``callable(str)`` for status lines.
    """

    def __init__(self, spec: ModelSpec, retrain: bool = False, progress: Callable[[str], None] | None = None):
        self.spec = spec
        self.retrain = retrain
        self.progress = progress or (lambda s: None)
        self._module = None
        self._dataset = None
        self._variants: dict[str, Variant] = {}
        self._identity: str | None = None
        self._data_key: str | None = None
        self.weights_info: dict[str, Any] = {}

    # -- model and data -------------------------------------------------------------------------
    @property
    def has_torch(self) -> bool:
        return self.spec.build is not None

    def module(self):
        """The trained FP32 ``nn.Module`` (eval mode)."""
        if self._module is None:
            from ..models.train import build_model, load_weights, trained_model

            if not self.has_torch:
                raise StageError(f"model '{self.spec.name}' is an ONNX file; torch stages need a torch model")
            if self.spec.source == "zoo" and self.spec.weights_path:
                self._module = load_weights(build_model(self.spec), self.spec.weights_path)
                self.weights_info = {"weights": self.spec.weights_path, "origin": "user"}
            elif self.spec.source == "zoo":
                self._module, self.weights_info = trained_model(self.spec, retrain=self.retrain, progress=self.progress)
            else:
                from ..models.train import eval_mode

                self._module = eval_mode(self.spec.build())
                self.weights_info = {"weights": self.spec.weights_path, "origin": self.spec.source}
        return self._module

    def fresh_module(self, arch: dict | None = None):
        from ..models.train import build_model

        if self.spec.source == "zoo":
            return build_model(self.spec, {**(self.spec.recipe or {}), **({"arch": arch} if arch else {})})
        return self.spec.build()

    def dataset(self):
        if self._dataset is None and self.spec.data is not None:
            self._dataset = self.spec.data()
        return self._dataset

    def calibration(self, n: int = CALIBRATION_SAMPLES) -> tuple[dict[str, np.ndarray], str]:
        """Up to ``n`` real training samples, or seeded random inputs when the model has no data."""
        ds = self.dataset()
        if ds is not None:
            rng = np.random.default_rng(0)
            idx = np.sort(rng.permutation(len(ds.train))[:n])
            return {k: v[idx] for k, v in ds.train.inputs.items()}, f"{len(idx)} real training samples"
        from ..models.spec import SECOND_DIM_SIZES

        feeds = self.spec.example_inputs({**SECOND_DIM_SIZES, "batch": 64}, seed=7)
        return feeds, "64 random inputs (no data given: pass --data for real calibration)"

    def identity(self) -> str:
        """Cache key of the baseline: the spec's fingerprint (inputs, outputs, metric, source identity)
        and the weights' identity (the committed recipe's hash, or the weights file's SHA-256)."""
        if self._identity is None:
            s = self.spec
            if s.weights_path:
                weights = sha256_file(s.weights_path)
            elif s.source == "zoo":
                from ..models.train import recipe_hash

                weights = recipe_hash(s)
            else:
                weights = "-"  # .pt2 / .onnx / hf: the file's hash is the spec's identity
            self._identity = baseline_key(s.fingerprint(), weights)
        return self._identity

    def data_key(self) -> str:
        """Identity of the data that data-reading stages see: ``spec.data_id`` for attached files, a
        fixed tag for data made by a zoo spec's own seeded code (keyed by its recipe already), a hash
        of the arrays for a dataset given from code, ``no-data`` when calibration falls back to seeded
        random inputs (determined by the input spec, which the baseline key covers)."""
        if self._data_key is None:
            s = self.spec
            if s.data is None:
                self._data_key = "no-data"
            elif s.data_id:
                self._data_key = s.data_id
            elif s.source in ("zoo", "hf"):
                self._data_key = f"{s.source}-data"
            else:
                self._data_key = hash_dataset(self.dataset())
        return self._data_key

    # -- variants -------------------------------------------------------------------------------
    def baseline(self) -> Variant:
        """The FP32 baseline: the torch model, or the given ONNX file for ONNX-only models."""
        if "baseline" in self._variants:
            return self._variants["baseline"]
        key = self.identity()
        if self.has_torch:
            v = load_cached(self.spec.name, "fp32-torch", key)
            if v is None:
                module = self.module()
                from ..models.train import save_weights

                v = Variant(self.spec.name, "fp32-torch", None, "baseline", "", {}, "torch", "fp32", key,
                            files=["weights.safetensors"], runtime="torch")
                with atomic_dir(artifact_dir(self.spec.name, v.name, key)) as d:
                    save_weights(module, d / "weights.safetensors")
                    write_meta(v, d)
                v.dir = str(artifact_dir(self.spec.name, v.name, key))
            v.info.setdefault("parameters", self._param_count())
        else:
            src = Path(self.spec.onnx_path)
            v = Variant(self.spec.name, "fp32-onnx", None, "baseline", "", {"source": str(src)}, "onnx", "fp32", key,
                        dir=str(src.parent.resolve()),
                        files=[src.name] + ([src.name + ".data"] if (src.parent / (src.name + ".data")).exists() else []),
                        runtime="onnxruntime")
        self._variants["baseline"] = v
        self._variants[v.name] = v
        return v

    def _param_count(self) -> int:
        try:
            return int(sum(p.numel() for p in self.module().parameters()))
        except (StageError, WeightsError):
            return 0

    def get(self, name: str) -> Variant:
        if name in self._variants:
            return self._variants[name]
        if name in ("fp32-torch", "fp32-onnx", "baseline") and (self.baseline().name == name or name == "baseline"):
            return self.baseline()
        raise StageError(f"model '{self.spec.name}' has no variant '{name}' built yet; build its parent first")

    def lineage(self, v: Variant) -> list[Variant]:
        """``v``, its parent, its parent's parent, ... as far as this context has built them."""
        chain, cur = [], v
        while cur is not None:
            chain.append(cur)
            cur = self._variants.get(cur.parent) if cur.parent else None
        return chain

    def build_planned(self, name: str, plan: list) -> Variant:
        """Build the variant ``name`` of a report plan (entries ``(name, stage, method, params, parent)``)
        and, first, its parents; ``fp32-torch`` is the baseline.

        Raises:
            StageError: ``name`` is not in the plan (the message lists the plan's names).
        """
        if name == "fp32-torch":
            return self.baseline()
        entries = {e[0]: e for e in plan}
        if name not in entries:
            raise StageError(f"unknown variant '{name}' of {self.spec.name}; use one of "
                             f"{', '.join(['fp32-torch'] + list(entries))}")
        _, stage, method, params, parent = entries[name]
        return self.build(name, stage, method, params, self.build_planned(parent, plan))

    def build(self, name: str, stage: str, method: str, params: dict | None = None,
              parent: Variant | str | None = None) -> Variant:
        """Build (or reuse from the cache) the variant ``name`` = ``stage/method(params)`` of ``parent``.

        Raises:
            StageError: the stage does not consume the parent's format, or fails.
        """
        params = dict(params or {})
        par = self.get(parent) if isinstance(parent, str) else (parent or self.baseline())
        impl = get_stage(stage, method)
        if impl.consumes != par.format:
            raise StageError(f"{stage} {method} consumes a {impl.consumes} model but '{par.name}' is {par.format}; "
                             + ("export to ONNX first" if impl.consumes == "onnx" else "start from the torch model"))
        data = [self.data_key(), int(params.get("samples", CALIBRATION_SAMPLES))] if impl.uses_data else None
        key = variant_key(par.key, stage, method, params, data, library_versions())
        v = load_cached(self.spec.name, name, key)
        if v is None:
            self.progress(f"{self.spec.name}: building {name} ({stage} {method})")
            out = artifact_dir(self.spec.name, name, key)
            with atomic_dir(out) as d:
                files, info = impl.fn(self, par, params, d)
                precision = info.pop("precision", impl.precision)
                v = Variant(self.spec.name, name, par.name, stage, method, params, impl.produces, precision, key,
                            files=files, info=info, runtime=_runtime_of(impl.produces))
                write_meta(v, d)
            v.dir = str(out)
        if "parameters" not in v.info:
            v.info["parameters"] = par.info.get("parameters", 0)
        self._variants[name] = v
        return v

    def torch_session(self, v: Variant, threads: int | None = None):
        """A :class:`TorchSession` for a torch variant (weights from its artifact, dtype from its info)."""
        import torch

        from ..models.train import load_weights
        from ..runtimes.session import TorchSession

        dtype = getattr(torch, v.info.get("dtype", "float32"))
        if v.name == "fp32-torch" and v.stage == "baseline":
            m = self.module()
        elif v.files and v.files[0].endswith(".pt2"):  # a re-shaped model build(arch) cannot express (prune/distill)
            from .prune import load_pt2_module

            m = load_pt2_module(Path(v.dir) / v.files[0])
        else:
            m = self.fresh_module(v.info.get("arch")).to(dtype)
            load_weights(m, Path(v.dir) / v.files[0])
        return TorchSession(m, [t.name for t in self.spec.inputs], self.spec.output_names, dtype=dtype, threads=threads)

    def session(self, v: Variant, threads: int | None = None):
        from .variants import open_variant_session

        return open_variant_session(v, self, threads=threads)


def hash_dataset(ds: Any) -> str:
    """A 16-hex-char hash of a :class:`~deepship.models.spec.Dataset`'s arrays (names, dtypes, shapes,
    bytes) for datasets given from code, which carry no file identity."""
    import hashlib

    h = hashlib.sha256()
    for split in (ds.train, ds.test, getattr(ds, "calibration", None)):
        if split is None:
            h.update(b"-")
            continue
        arrays = sorted(split.inputs.items()) + ([("targets", split.targets)] if split.targets is not None else [])
        for name, a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def _runtime_of(fmt: str) -> str:
    return {"torch": "torch", "onnx": "onnxruntime"}.get(fmt, fmt.split(":", 1)[-1])


# ---- stage implementations --------------------------------------------------------------------

@register_stage("export", "onnx", "torch", "onnx")
def _export(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """torch -> ONNX with the dynamo exporter, named dynamic dims, parity at two shapes."""
    from ..exporters.onnx import DEFAULT_OPSET, export_onnx

    module = ctx.torch_session(parent).module
    if ctx.spec.extra.get("exporter") == "optimum":  # Hugging Face folders: Optimum, deepship's exporter as fallback
        from ..exporters.hf import HF_OPSET, export_hf

        res, how = export_hf(module, ctx.spec, out / "model.onnx", opset=int(params.get("opset", HF_OPSET)),
                             force_fallback=bool(params.get("fallback", False)))
        return [f.name for f in res.files], {"opset": res.opset, "parity": res.parity,
                                             "dynamic_dims": res.dynamic_dims, **how}
    res = export_onnx(module, ctx.spec, out / "model.onnx", opset=int(params.get("opset", DEFAULT_OPSET)))
    return [f.name for f in res.files], {"opset": res.opset, "parity": res.parity, "dynamic_dims": res.dynamic_dims,
                                         "exporter": "torch.onnx.export(dynamo=True)"}


def _onnx_stage(fn_name: str):
    def run(ctx: ModelContext, parent: Variant, params: dict, out: Path):
        from . import quantize as Q

        fn = getattr(Q, fn_name)
        if fn_name == "int8_static":
            calib, desc = ctx.calibration(int(params.get("samples", CALIBRATION_SAMPLES)))
            info = Q.int8_static(parent.path, out / "model.onnx", calib, method=params.get("calibration", "minmax"),
                                 per_channel=bool(params.get("per_channel", True)))
            info["calibration_data"] = desc
        elif fn_name == "int4_weight_only":
            info = Q.int4_weight_only(parent.path, out / "model.onnx", block_size=int(params.get("block_size", 32)))
        elif fn_name == "int8_dynamic":
            info = Q.int8_dynamic(parent.path, out / "model.onnx", per_channel=bool(params.get("per_channel", False)))
        else:
            info = fn(parent.path, out / "model.onnx")
        files = ["model.onnx"] + (["model.onnx.data"] if (out / "model.onnx.data").exists() else [])
        if not info["nodes"]["quantized"]:
            info["warning"] = "no node was quantized: the model has no op this method handles"
        return files, info

    run.__doc__ = fn_name
    return run


register_stage("quantize", "int8-dynamic", "onnx", "onnx", "int8")(_onnx_stage("int8_dynamic"))
register_stage("quantize", "int8-static", "onnx", "onnx", "int8", uses_data=True)(_onnx_stage("int8_static"))
register_stage("quantize", "fp16", "onnx", "onnx", "fp16")(_onnx_stage("fp16"))
register_stage("quantize", "int4-weight-only", "onnx", "onnx", "int4")(_onnx_stage("int4_weight_only"))


@register_stage("quantize", "bf16", "torch", "torch", "bf16")
def _bf16(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """torch bfloat16 weights and compute (AMX-BF16 on CPUs that have it)."""
    import torch

    from ..models.train import save_weights

    m = ctx.torch_session(parent).module
    mb = ctx.fresh_module(parent.info.get("arch"))
    mb.load_state_dict(m.state_dict())
    mb = mb.to(torch.bfloat16).eval()
    save_weights(mb, out / "weights.safetensors")
    n = sum(1 for p in mb.parameters())
    return ["weights.safetensors"], {"dtype": "bfloat16", "arch": parent.info.get("arch"),
                                     "nodes": {"quantized": {"all weight tensors": n}, "kept_fp32": {}},
                                     "library": "torch (tensor.to(torch.bfloat16))"}


@register_stage("engine", "onnxruntime", "onnx", "engine:onnxruntime")
def _engine_ort(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """ONNX Runtime offline-optimized model with its session options."""
    from ..runtimes.engines import get_backend

    b = get_backend("onnxruntime")
    files, info = b.build(parent, out, params.get("precision", "fp32"), params)
    info["backend"] = "onnxruntime"
    info["precision"] = info.get("precision", parent.precision)
    return files, info


@register_stage("engine", "inductor", "torch", "engine:inductor", uses_data=True)
def _engine_inductor(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """AOTInductor .pt2 package of the torch model (FP32, BF16, FP16, INT8 through PT2E)."""
    from ..runtimes.engines import get_backend

    files, info = get_backend("inductor").build(parent, out, params.get("precision", "fp32"), params, ctx=ctx)
    info["backend"] = "inductor"
    return files, info


@register_stage("engine", "tensorrt", "onnx", "engine:tensorrt", uses_data=True)
def _engine_tensorrt(ctx: ModelContext, parent: Variant, params: dict, out: Path):
    """TensorRT serialized engine (plan) with optimization profiles and build metadata."""
    from ..runtimes.engines import get_backend

    files, info = get_backend("tensorrt").build(parent, out, params.get("precision", "fp32"), params, ctx=ctx)
    info["backend"] = "tensorrt"
    return files, info


# stages defined in their own modules register themselves on import
from . import distill as _distill, prune as _prune  # noqa: E402,F401
