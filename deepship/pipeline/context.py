"""The per-model context that builds variants through the content-addressed cache.

A :class:`ModelContext` holds one resolved :class:`~deepship.models.spec.ModelSpec`, its trained
module and data (loaded on first use), the variants built so far, and the family's adapter
(:func:`deepship.pipeline.adapters.adapter_for`). :meth:`ModelContext.build` runs a registered stage
(:mod:`deepship.pipeline.stages`) into the cache, or reuses a valid cached artifact: the key covers
the spec, the weights, the stage and its parameters, the data the stage reads and the library
versions (:mod:`deepship.pipeline.variants`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import StageError, WeightsError
from ..models.spec import SECOND_DIM_SIZES, ModelSpec
from ..models.train import build_model, eval_mode, load_weights, recipe_hash, save_weights, trained_model
from ..models.user import load_pt2_module
from ..runtimes.session import TorchSession
from ..utils import atomic_dir, cache_root, sha256_file, sweep_stale_temp
from .adapters import adapter_for
from .stages import get_stage
from .variants import (Variant, artifact_dir, baseline_key, library_versions, load_cached, open_variant_session,
                       variant_key, write_meta)

#: calibration samples taken from the data for INT8 static quantization (``samples`` overrides)
CALIBRATION_SAMPLES = 256


class ModelContext:
    """Everything needed to build and run one model's variants.

    Args:
        spec: the resolved :class:`ModelSpec`.
        retrain: ignore committed/cached weights and run the training recipe.
        progress: optional ``callable(str)`` for status lines.
    """

    def __init__(self, spec: ModelSpec, retrain: bool = False, progress: Callable[[str], None] | None = None):
        self.spec = spec
        self.arch = adapter_for(spec)  # the family's adapter: its stages and pruning support register here
        self.retrain = retrain
        self.progress = progress or (lambda s: None)
        self._module = None
        self._dataset = None
        self._variants: dict[str, Variant] = {}
        self._identity: str | None = None
        self._swept = False
        self._data_key: str | None = None
        self.weights_info: dict[str, Any] = {}

    # -- model and data -------------------------------------------------------------------------
    @property
    def has_torch(self) -> bool:
        return self.spec.build is not None

    def module(self):
        """The trained FP32 ``nn.Module`` (eval mode)."""
        if self._module is None:
            if not self.has_torch:
                raise StageError(f"model '{self.spec.name}' is an ONNX file; torch stages need a torch model")
            if self.spec.source == "zoo" and self.spec.weights_path:
                self._module = load_weights(build_model(self.spec), self.spec.weights_path)
                self.weights_info = {"weights": self.spec.weights_path, "origin": "user"}
            elif self.spec.source == "zoo":
                self._module, self.weights_info = trained_model(self.spec, retrain=self.retrain, progress=self.progress)
            else:
                self._module = eval_mode(self.spec.build())
                self.weights_info = {"weights": self.spec.weights_path, "origin": self.spec.source}
        return self._module

    def fresh_module(self, arch: dict | None = None):
        """An untrained module of the spec (zoo: with ``arch`` applied, as a prune stage recorded it)."""
        if self.spec.source == "zoo":
            return build_model(self.spec, {**(self.spec.recipe or {}), **({"arch": arch} if arch else {})})
        return self.spec.build()

    def dataset(self):
        if self._dataset is None and self.spec.data is not None:
            self._dataset = self.spec.data()
        return self._dataset

    def calibration(self, n: int = CALIBRATION_SAMPLES) -> tuple[dict[str, np.ndarray], str]:
        """INT8 calibration samples: up to ``n`` (seeded pick) of the dataset's calibration split
        (``--calibration-data``, or samples of ``--data`` held out from evaluation), else of its
        training split, else seeded random inputs when the model has no data.

        Returns:
            ``({input name: array (k, ...)}, description)``, e.g. ``"256 samples of calib.npz (--calibration-data)"``.
        """
        ds = self.dataset()
        if ds is not None:
            part = ds.calibration if ds.calibration is not None else ds.train
            src = ds.calibration_source if ds.calibration is not None else "real training samples"
            idx = np.sort(np.random.default_rng(0).permutation(len(part))[:n])
            return {k: v[idx] for k, v in part.inputs.items()}, f"{len(idx)} {src}"
        feeds = self.spec.example_inputs({**SECOND_DIM_SIZES, "batch": 64}, seed=7)
        return feeds, "64 random inputs (no data given: pass --data or --calibration-data for real calibration)"

    def identity(self) -> str:
        """Cache key of the baseline: the spec's fingerprint (inputs, outputs, metric, source identity)
        and the weights' identity (the committed recipe's hash, or the weights file's SHA-256)."""
        if self._identity is None:
            s = self.spec
            if s.weights_path:
                weights = sha256_file(s.weights_path)
            elif s.source == "zoo":
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
                self._sweep_once()
                v = Variant(self.spec.name, "fp32-torch", None, "baseline", "", {}, "torch", "fp32", key,
                            files=["weights.safetensors"], runtime="torch")
                with atomic_dir(artifact_dir(self.spec.name, v.name, key),
                                keep_existing=lambda _: load_cached(self.spec.name, "fp32-torch", key) is not None) as d:
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

    def _sweep_once(self) -> None:
        """Remove the temporary folders that builds of this model killed earlier left (their process
        is gone), once per context, before it writes to the cache."""
        if not self._swept:
            sweep_stale_temp(cache_root() / "artifacts" / self.spec.name)
            self._swept = True

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
        self._sweep_once()
        data = [self.data_key(), int(params.get("samples", CALIBRATION_SAMPLES))] if impl.uses_data else None
        key = variant_key(par.key, stage, method, params, data, library_versions())
        v = load_cached(self.spec.name, name, key)
        if v is None:
            self.progress(f"{self.spec.name}: building {name} ({stage} {method})")
            out = artifact_dir(self.spec.name, name, key)
            # a shared cache (Ray workers) may finish the same key first: keep that one, it is equal
            with atomic_dir(out, keep_existing=lambda _: load_cached(self.spec.name, name, key) is not None) as d:
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

        dtype = getattr(torch, v.info.get("dtype", "float32"))
        if v.name == "fp32-torch" and v.stage == "baseline":
            m = self.module()
        elif v.files and v.files[0].endswith(".pt2"):  # a re-shaped model build(arch) cannot express (prune/distill)
            m = load_pt2_module(Path(v.dir) / v.files[0])
        else:
            m = self.fresh_module(v.info.get("arch")).to(dtype)
            load_weights(m, Path(v.dir) / v.files[0])
        return TorchSession(m, [t.name for t in self.spec.inputs], self.spec.output_names, dtype=dtype, threads=threads)

    def session(self, v: Variant, threads: int | None = None):
        """A :class:`~deepship.runtimes.session.Session` for the built variant ``v``."""
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
