"""The ONNX Runtime engine backend: an offline-optimized model plus the session options to run it.

``build`` opens an ``onnxruntime.InferenceSession`` with ``graph_optimization_level=ORT_ENABLE_ALL``
and ``optimized_model_filepath`` set, so ONNX Runtime writes the graph after its fusions (Conv+Relu,
Gemm+activation, layout transforms for the CPU EP). The session options used are stored beside it in
``engine.json``; the engine session reloads the optimized graph with optimizations off and those
options on. The optimized graph can hold CPU-EP-specific ops, so it is tied to the provider it was
built for (recorded).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import ArtifactError, StageError
from ...utils import cache_root, check_onnx_file, default_threads
from ..session import OrtSession, session_options
from . import BuildSource, register_backend
from .providers import create_session, provider_options, resolve_providers, trt_profile_shapes


class OnnxRuntimeBackend:
    """``optimize engine --backend onnxruntime [--providers tensorrt,cuda,cpu|auto]``.

    The execution providers are resolved and recorded by :mod:`.providers`: ``engine.json`` holds the
    providers asked for, those that loaded, per-EP node counts from a profiled run, and the EP that
    ran (``provider_record``); the engine session profiles one run at open time too, so the
    report's ``provider`` is the EP that ran there. Precision comes from the source (FP16 and INT8 QDQ
    ONNX variants, picked by :func:`deepship.pipeline.engines.engine_source`), except on the TensorRT EP, which builds FP16 from the
    FP32 model with ``trt_fp16_enable``. With a GPU EP first, the offline graph is written at the
    provider-independent ``basic`` level and the session optimizes at ``all``.
    """

    name = "onnxruntime"
    consumes = "onnx"
    precisions = ("fp32", "fp16", "int8")

    def available(self) -> tuple[bool, str]:
        return True, ""

    def build(self, parent: BuildSource, out_dir: Path, precision: str, params: dict) -> tuple[list[str], dict]:
        """Write ``model.ort.onnx`` (ONNX Runtime's optimized graph) and ``engine.json`` (session options,
        providers asked for and run).

        Raises:
            StageError: a precision this backend does not build, or one that differs from the source's.
        """
        import onnxruntime as ort

        providers = resolve_providers(params.get("providers"))
        trt_first = providers[0] == "TensorrtExecutionProvider"
        if precision not in self.precisions:
            raise StageError(f"the onnxruntime engine builds {', '.join(self.precisions)}; got '{precision}'")
        if precision != parent.precision and not (trt_first and precision == "fp16" and parent.precision == "fp32"):
            raise StageError(f"the onnxruntime engine takes its precision from its parent; '{parent.name}' is "
                             f"{parent.precision}, not {precision}: quantize first (optimize quantize --method "
                             f"{'fp16' if precision == 'fp16' else 'int8-static'}) or pass --precision {parent.precision}")
        threads = int(params.get("threads") or 0)
        shapes = trt_profile_shapes(parent.path, params.get("shapes")) if trt_first else None
        options = provider_options(providers, precision, cache_dir=cache_root() / "ort-tensorrt-cache", shapes=shapes)
        so = ort.SessionOptions()
        gpu_first = providers[0] != "CPUExecutionProvider"
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if gpu_first
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        so.optimized_model_filepath = str(out_dir / "model.ort.onnx")
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        sess, _ = create_session(parent.path, providers, options, so=so, profile=False)
        del sess
        level = "all" if gpu_first else "disabled"
        _, rec = create_session(out_dir / "model.ort.onnx", providers, options,
                                so=session_options(level, threads or None), strict=bool(params.get("strict")))
        opts = {"backend": "onnxruntime", "graph_optimization_level": level, "execution_mode": "sequential",
                "intra_op_num_threads": threads or None, "inter_op_num_threads": 1,
                "providers": rec.loaded, "requested": providers, "provider_options": options,
                "onnxruntime": ort.__version__, "built_with_level": "basic" if gpu_first else "all",
                "precision": precision, "provider_record": rec.to_dict()}
        (out_dir / "engine.json").write_text(json.dumps(opts, indent=2))
        files = ["model.ort.onnx", "engine.json"]
        if (out_dir / "model.ort.onnx.data").exists():
            files.insert(1, "model.ort.onnx.data")
        return files, {"providers": rec.loaded, "provider": rec.ran, "provider_record": rec.to_dict(),
                       "precision": precision, "session_options": opts}

    def session(self, variant: Any, threads: int | None = None):
        opts = json.loads((Path(variant.dir) / "engine.json").read_text())
        return EngineOrtSession(variant.path, opts.get("requested") or opts["providers"], opts.get("provider_options"),
                                threads=threads or opts.get("intra_op_num_threads"),
                                graph_optimization_level=opts.get("graph_optimization_level", "disabled"))


class EngineOrtSession(OrtSession):
    """An :class:`~deepship.runtimes.session.OrtSession` on chosen execution providers (with options).

    One profiled run at open time fills ``provider_record``; ``provider`` is the EP that ran the most
    nodes (not merely the first EP that loaded).

    Raises:
        ArtifactError: missing or corrupt model.
    """

    def __init__(self, path: Any, providers: list, provider_options: list | None = None, threads: int | None = None,
                 graph_optimization_level: str = "disabled"):
        check_onnx_file(path)
        self.threads = threads or default_threads()
        try:
            self.sess, rec = create_session(path, providers, provider_options,
                                            so=session_options(graph_optimization_level, self.threads))
        except StageError as e:
            raise ArtifactError(str(e)) from None
        self.provider_record = rec.to_dict()
        self.path = str(path)
        self.provider = rec.ran
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self._in_types = {i.name: i.type for i in self.sess.get_inputs()}
        self._in_shapes = {i.name: i.shape for i in self.sess.get_inputs()}


register_backend(OnnxRuntimeBackend())
