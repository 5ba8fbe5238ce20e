"""The OpenVINO engine backend: OpenVINO's IR from the ONNX model, INT8 by NNCF post-training quantization.

``optimize engine MODEL --backend openvino --precision fp32|bf16|int8 [--hint latency|throughput]``:

- ``fp32``: ``openvino.convert_model`` reads the FP32 ONNX variant (dynamic dims kept) and
  ``openvino.save_model`` writes ``model.xml`` + ``model.bin`` with FP32 weights
  (``compress_to_fp16=False``).
- ``bf16``: the same FP32 IR, compiled with ``INFERENCE_PRECISION_HINT = bf16``: OpenVINO's CPU plugin
  then runs MatMul/Conv in BF16 (AMX tiles or AVX-512 BF16 where the CPU has them). On a CPU without
  native BF16 the plugin keeps f32; the precision that ran is read back from the compiled model and
  recorded, so a row never claims BF16 it did not get.
- ``int8``: the same model quantized by ``nncf.quantize`` (NNCF post-training quantization: per-channel
  symmetric INT8 weights, activations calibrated on the model's calibration samples, the ``MIXED``
  preset; ``--ignored NODE,...`` keeps named nodes in float, e.g. from a sensitivity table; the
  ``inference_precision`` parameter, ``f32`` by default or ``bf16``, is what those float layers run in).

The session compiles the IR for the CPU with the recorded performance hint (``LATENCY`` by default:
one stream; ``THROUGHPUT``: OpenVINO picks streams for parallel requests) and
``INFERENCE_PRECISION_HINT = f32`` for fp32 and int8. Without that hint OpenVINO runs FP32 layers in BF16 on CPUs with
AVX-512 BF16 or AMX (this VM's Xeon), which changes the numbers an FP32 row is supposed to keep; the
precision that ran, the hint, the stream count and the device go in ``engine.json`` and the row.

Needs the ``openvino`` extra (``pip install -e '.[openvino]'``: openvino, nncf).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ArtifactError, InputSpecError, StageError
from ...utils import default_threads
from ..session import Session
from . import BuildSource, register_backend

HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}
#: what the float layers run in, by engine precision (int8: the layers NNCF left in float)
FLOAT_PRECISIONS = ("f32", "bf16")


class OpenVinoBackend:
    """``optimize engine --backend openvino`` (see the module docstring)."""

    name = "openvino"
    consumes = "onnx"
    precisions = ("fp32", "bf16", "int8")

    def available(self) -> tuple[bool, str]:
        try:
            import nncf  # noqa: F401
            import openvino  # noqa: F401
        except ImportError:
            return False, "the openvino backend needs openvino and nncf: pip install -e '.[openvino]'"
        return True, ""

    def build(self, source: BuildSource, out_dir: Path, precision: str, params: dict) -> tuple[list[str], dict]:
        """Write ``model.xml``, ``model.bin`` and ``engine.json``.

        Raises:
            StageError: openvino or nncf missing, a precision other than fp32/int8, a source that is
                not FP32, an unknown hint, or a failed conversion/quantization (its first line).
        """
        ok, why = self.available()
        if not ok:
            raise StageError(why)
        import openvino as ov

        if precision not in self.precisions:
            raise StageError(f"the openvino engine builds {', '.join(self.precisions)}; got '{precision}'")
        if source.precision != "fp32":
            raise StageError(f"the openvino engine converts the FP32 ONNX model; '{source.name}' is {source.precision}")
        hint = str(params.get("hint") or "latency").lower()
        if hint not in HINTS:
            raise StageError(f"--hint {hint} is not an OpenVINO performance hint; use latency or throughput")
        infer = "bf16" if precision == "bf16" else str(params.get("inference_precision") or "f32").lower()
        if infer not in FLOAT_PRECISIONS or (precision == "fp32" and infer != "f32"):
            raise StageError(f"inference_precision {infer} is not valid for an openvino {precision} engine; "
                             "use f32 (or bf16 for the float layers of int8)")
        try:
            model = ov.convert_model(str(source.path))
        except Exception as e:  # openvino raises its own exception types
            raise StageError(f"openvino cannot convert {source.path}: {str(e).strip().splitlines()[0][:200]}") from None
        info: dict[str, Any] = {"openvino": ov.__version__, "precision": precision, "hint": HINTS[hint], "device": "CPU",
                                "provider": "openvino:CPU", "inference_precision_requested": infer}
        if precision == "int8":
            info.update(_quantize(model, source, params))
            model = info.pop("_model")
        ov.save_model(model, str(out_dir / "model.xml"), compress_to_fp16=False)
        opts = {"backend": "openvino", **info}
        (out_dir / "engine.json").write_text(json.dumps(opts, indent=2))
        sess = OpenVinoSession(out_dir / "model.xml", opts, threads=int(params.get("threads") or 0) or None)
        info.update(sess.record)
        return ["model.xml", "model.bin", "engine.json"], info

    def session(self, variant: Any, threads: int | None = None) -> "OpenVinoSession":
        opts = json.loads((Path(variant.dir) / "engine.json").read_text())
        return OpenVinoSession(variant.path, opts, threads=threads)


def _quantize(model: Any, source: BuildSource, params: dict) -> dict:
    """NNCF post-training quantization of ``model`` on the source's calibration samples.

    ``params`` (all optional): ``ignored`` (node names kept in float, comma-separated), ``samples``
    (calibration samples used, at most what the model has), ``smooth_quant`` (SmoothQuant alpha for
    MatMul, Xiao et al. 2023 as NNCF implements it: NNCF applies 0.95 to transformers by default; a
    negative value turns it off), ``overflow_fix`` (``first_layer_only``, NNCF's default: 7-bit weights
    in the first layer against u8s8 saturation on CPUs without VNNI; ``enable``; ``disable``).
    """
    import logging

    import nncf
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, AdvancedSmoothQuantParameters,
                                                       OverflowFix)

    if source.calibration is None:
        raise StageError(f"INT8 needs calibration data and '{source.name}' has none; pass --calibration-data")
    samples, described = source.calibration()
    names = list(samples)
    n = len(samples[names[0]])
    if params.get("samples"):
        n = max(1, min(n, int(params["samples"])))
    items = [{k: np.ascontiguousarray(samples[k][i:i + 1]) for k in names} for i in range(n)]
    ignored = [s for s in str(params.get("ignored") or "").split(",") if s]
    kwargs: dict[str, Any] = {"subset_size": n, "preset": nncf.QuantizationPreset.MIXED}
    # attention graphs get NNCF's transformer scheme (it keeps Softmax, LayerNorm-like and residual-path
    # ops in float, and quantizes the MatMul inputs as transformers need)
    transformer = any(op.get_type_name() in ("Softmax", "SoftMax", "ScaledDotProductAttention") for op in model.get_ops())
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if ignored:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=ignored, validate=True)
    advanced: dict[str, Any] = {}
    sq = params.get("smooth_quant")
    if sq is not None:
        advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=float(sq))
    fix = params.get("overflow_fix")
    if fix is not None:
        fixes = {f.value: f for f in OverflowFix}
        if fix not in fixes:
            raise StageError(f"overflow_fix {fix} is not an NNCF overflow fix; use one of {', '.join(fixes)}")
        advanced["overflow_fix"] = fixes[fix]
    if advanced:
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(**advanced)
    logging.getLogger("nncf").setLevel(logging.WARNING)  # one INFO line per ignored node otherwise
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws progress bars on stdout
            q = nncf.quantize(model, nncf.Dataset(items), **kwargs)
    except Exception as e:
        raise StageError(f"nncf.quantize failed: {str(e).strip().splitlines()[0][:200]}") from None
    return {"_model": q, "quantizer": f"nncf {nncf.__version__} quantize (post-training, preset mixed)",
            "calibration": "nncf PTQ (min-max ranges, fast bias correction)", "calibration_data": described, "calibration_samples": n,
            "ignored_scope": ignored, "nncf_model_type": "transformer" if transformer else "default",
            "smooth_quant": sq, "overflow_fix": fix or "first_layer_only"}


class OpenVinoSession(Session):
    """An OpenVINO compiled model behind the :class:`~deepship.runtimes.session.Session` interface:
    ``run({input name: array}) -> {output name: array}`` (one infer request per call, so calls from
    several threads are safe).

    Attributes:
        record: what ran: ``device``, ``hint``, ``streams`` (``NUM_STREAMS``), ``inference_precision``,
            ``threads``.

    Raises:
        ArtifactError: a missing or unreadable IR, or openvino missing.
    """

    runtime = "openvino"

    def __init__(self, path: str | Path, opts: dict, threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise ArtifactError("this engine needs openvino: pip install -e '.[openvino]'") from None
        path = Path(path)
        if not path.is_file() or not path.with_suffix(".bin").is_file():
            raise ArtifactError(f"{path} (and its .bin) is missing; rebuild the engine")
        self.threads = threads or default_threads()
        config = {"PERFORMANCE_HINT": opts.get("hint", "LATENCY"),
                  "INFERENCE_PRECISION_HINT": opts.get("inference_precision_requested", "f32"),
                  "INFERENCE_NUM_THREADS": int(self.threads)}
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as e:
            raise ArtifactError(f"OpenVINO cannot compile {path}: {str(e).strip().splitlines()[0][:200]}") from None
        self.path, self.provider = str(path), "openvino:CPU"
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.record = {"device": "CPU", "hint": config["PERFORMANCE_HINT"], "threads": int(self.threads),
                       "streams": int(self.compiled.get_property("NUM_STREAMS")),
                       "inference_precision": _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))}

    def run(self, feeds: Any) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputSpecError(f"missing input '{missing[0]}'; the model takes {', '.join(self.input_names)}")
        try:
            res = self.compiled.create_infer_request().infer({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        except Exception as e:
            shapes = ", ".join(f"{n}{list(np.shape(feeds[n]))}" for n in self.input_names)
            raise InputSpecError(f"OpenVINO rejected inputs {shapes}: {str(e).strip().splitlines()[0][:160]}") from None
        return {o.get_any_name(): np.asarray(v) for o, v in res.items()}


def _type_name(t: Any) -> str:
    """``"f32"`` for OpenVINO's ``Type.f32`` (its ``to_string``), else ``str(t)``."""
    return t.to_string() if hasattr(t, "to_string") else str(t)


register_backend(OpenVinoBackend())
