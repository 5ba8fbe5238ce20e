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

from ...errors import StageError
from . import register_backend


class OnnxRuntimeBackend:
    name = "onnxruntime"
    consumes = "onnx"
    precisions = ("fp32",)

    def available(self) -> tuple[bool, str]:
        return True, ""

    def build(self, parent: Any, out_dir: Path, precision: str, params: dict) -> tuple[list[str], dict]:
        import onnxruntime as ort

        if precision not in self.precisions:
            raise StageError(f"the onnxruntime engine builds {', '.join(self.precisions)} only; quantize first "
                             f"(optimize quantize --method int8-static) and build the engine from that variant")
        providers = list(params.get("providers") or ["CPUExecutionProvider"])
        threads = int(params.get("threads") or 0)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(out_dir / "model.ort.onnx")
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(parent.path), so, providers=providers)
        used = sess.get_providers()
        del sess
        opts = {"graph_optimization_level": "disabled", "execution_mode": "sequential",
                "intra_op_num_threads": threads or None, "inter_op_num_threads": 1,
                "providers": used, "onnxruntime": ort.__version__, "built_with_level": "all"}
        (out_dir / "engine.json").write_text(json.dumps(opts, indent=2))
        files = ["model.ort.onnx", "engine.json"]
        if (out_dir / "model.ort.onnx.data").exists():
            files.insert(1, "model.ort.onnx.data")
        return files, {"providers": used, "session_options": opts}

    def session(self, variant: Any, threads: int | None = None):
        from ..session import OrtSession

        opts = json.loads((Path(variant.dir) / "engine.json").read_text())
        return OrtSession(variant.path, providers=opts["providers"],
                          threads=threads or opts.get("intra_op_num_threads"),
                          graph_optimization_level=opts.get("graph_optimization_level", "disabled"))


register_backend(OnnxRuntimeBackend())
