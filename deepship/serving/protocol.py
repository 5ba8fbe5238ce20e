"""Open Inference Protocol (KServe v2) REST codecs, with Triton's binary tensor data extension.

The protocol is the one spoken by NVIDIA Triton Inference Server and KServe, so their clients
(``tritonclient[http]``, KServe's ``InferenceRESTClient``, plain ``curl``) work unchanged:

- ``POST /v2/models/{name}/infer`` takes ``{"id"?, "parameters"?, "inputs": [{"name", "shape",
  "datatype", "data"}], "outputs"?: [{"name", "parameters"?}]}`` and answers ``{"model_name",
  "model_version", "id"?, "outputs": [{"name", "shape", "datatype", "data"}]}``. ``data`` is the
  tensor in row-major order, flat or nested.
- Binary tensor data extension (Triton ``docs/protocol/extension_binary_data.md``): the request
  header ``Inference-Header-Content-Length: N`` says the first ``N`` bytes of the body are the JSON;
  an input with ``"parameters": {"binary_data_size": B}`` has no ``data`` and its ``B`` raw
  little-endian bytes follow the JSON, inputs in order. An output asked for with
  ``"parameters": {"binary_data": true}`` (or every output, with the request parameter
  ``"binary_data_output": true``) comes back the same way, with ``binary_data_size`` in its
  parameters and the response header ``Inference-Header-Content-Length``.

JSON is parsed and written with orjson (about 10x faster than the ``json`` module on these bodies).
Datatypes are the protocol's names (``FP32``, ``INT64``, ...; see :data:`V2_TO_NUMPY`). ``BF16``
and ``BYTES`` tensors are not served (no model here takes them) and are rejected with a 400.

Every malformed or mismatching request raises :class:`RequestError` with the HTTP status to answer
and a one-line message naming the tensor and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import orjson

from ..errors import DeepshipError

#: Open Inference Protocol datatype -> numpy dtype.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
#: numpy dtype name -> Open Inference Protocol datatype.
NUMPY_TO_V2: dict[str, str] = {v.name: k for k, v in V2_TO_NUMPY.items()}
#: ONNX Runtime type string -> numpy dtype name (``tensor(string)`` maps to ``object``: BYTES).
ORT_TO_NUMPY: dict[str, str] = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool", "tensor(string)": "object",
}
#: Triton model-configuration type names (``GET /v2/models/{name}/config``).
TRITON_CONFIG_TYPES = {k: f"TYPE_{'STRING' if k == 'BYTES' else k}" for k in list(V2_TO_NUMPY) + ["BYTES"]}

HEADER_LENGTH = "Inference-Header-Content-Length"


class RequestError(DeepshipError):
    """A request the server answers with an error status (400 bad input, 404 unknown model,
    413 body too large, 503 overloaded or timed out).

    Attributes:
        status: the HTTP status code.
        retry_after_s: for 503, the ``Retry-After`` header value in seconds (``None`` otherwise).
    """

    def __init__(self, message: str, status: int = 400, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


def v2_datatype(dtype: str | np.dtype) -> str:
    """The protocol datatype for a numpy dtype (``float32`` -> ``FP32``; ``object`` -> ``BYTES``)."""
    name = np.dtype(dtype).name
    return "BYTES" if name == "object" else NUMPY_TO_V2.get(name, name.upper())


def v2_shape(dims: Sequence[int | str]) -> list[int]:
    """Protocol shape: dynamic dims (named, ``str``) become ``-1``."""
    return [d if isinstance(d, int) else -1 for d in dims]


@dataclass
class InferRequest:
    """One decoded ``/infer`` request.

    Attributes:
        inputs: input name -> numpy array (validated against the model's signature).
        batch: samples in the request (size of axis 0; 1 for a model without a batch axis).
        outputs: requested outputs as ``(name, binary)``; empty means every output.
        classification: output name -> ``k`` for outputs asked for with ``"parameters":
            {"classification": k}`` (tritonclient's ``class_count``): answered as the top ``k`` of each
            row, ``BYTES`` strings ``"score:index"`` (Triton's classification extension).
        binary_output: the request-level ``binary_data_output`` parameter.
        id: the request ``id`` echoed in the response (``None`` if not given).
        timeout_us: the request's ``timeout`` parameter in microseconds (``None`` if not given).
    """

    inputs: dict[str, np.ndarray]
    batch: int
    outputs: list[tuple[str, bool]] = field(default_factory=list)
    binary_output: bool = False
    id: str | None = None
    timeout_us: float | None = None
    classification: dict[str, int] = field(default_factory=dict)


def _bad(msg: str) -> RequestError:
    return RequestError(msg, 400)


class _Compiled:
    """A model signature prepared once for request decoding (datatype, numpy dtype, dims, v2 shape)."""

    __slots__ = ("name", "inputs", "order", "outputs", "max_batch_size")

    def __init__(self, model: Any):
        self.name = model.name
        self.inputs = {t.name: (v2_datatype(t.dtype), V2_TO_NUMPY.get(v2_datatype(t.dtype)), tuple(t.dims),
                                v2_shape(t.dims)) for t in model.inputs}
        self.order = [t.name for t in model.inputs]
        self.outputs = {t.name for t in model.outputs}
        self.max_batch_size = model.max_batch_size

    def describe(self) -> str:
        return ", ".join(f"{n}:{dt}{shape}" for n, (dt, _, _, shape) in self.inputs.items())


def _compiled(model: Any) -> _Compiled:
    c = getattr(model, "_v2_compiled", None)
    if c is None:
        c = _Compiled(model)
        try:
            model._v2_compiled = c
        except AttributeError:
            pass
    return c


def decode_infer_request(body: bytes, header_length: str | None, signature: Any) -> InferRequest:
    """Decode and validate an ``/infer`` body against a model signature.

    Args:
        body: the raw request body (JSON, or JSON + binary tensors).
        header_length: the ``Inference-Header-Content-Length`` header value, or ``None``.
        signature: a :class:`~deepship.serving.repository.ServedModel` (``name``, ``inputs`` and
            ``outputs`` as :class:`~deepship.models.spec.TensorSpec` lists, ``max_batch_size``).

    Returns:
        :class:`InferRequest` whose arrays have the model's dtypes and shapes.

    Raises:
        RequestError: (400) malformed JSON, bad binary sizes, unknown / missing / duplicate input,
            wrong datatype, shape or element count, a batch over ``max_batch_size``, an unknown
            requested output.
    """
    sig = _compiled(signature)
    if header_length is not None:
        try:
            hlen = int(header_length)
        except ValueError:
            raise _bad(f"{HEADER_LENGTH} '{header_length[:20]}' is not an integer") from None
        if not 0 < hlen <= len(body):
            raise _bad(f"{HEADER_LENGTH} {hlen} does not fit the {len(body)}-byte body")
    else:
        hlen = len(body)
    try:
        req = orjson.loads(memoryview(body)[:hlen] if hlen != len(body) else body)
    except ValueError as e:
        raise _bad(f"request body is not valid JSON ({str(e)[:80]}); send an Open Inference Protocol infer request") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise _bad("request JSON needs a non-empty 'inputs' list of {name, shape, datatype, data}")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("request 'parameters' must be a JSON object")
    offset = hlen
    arrays: dict[str, np.ndarray] = {}
    for i, inp in enumerate(req["inputs"]):
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise _bad(f"inputs[{i}] needs a 'name'; model '{sig.name}' takes {sig.describe()}")
        name = inp["name"]
        spec = sig.inputs.get(name)
        if spec is None:
            raise _bad(f"model '{sig.name}' has no input '{name[:64]}'; it takes {sig.describe()}")
        if name in arrays:
            raise _bad(f"input '{name}' is given twice")
        expected_dt, npdt, dims, vshape = spec
        dt = inp.get("datatype")
        if dt != expected_dt:
            raise _bad(f"input '{name}' has datatype {str(dt)[:16]}, model '{sig.name}' expects {expected_dt}")
        shape = inp.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _bad(f"input '{name}' needs 'shape' as a list of non-negative integers")
        if len(shape) != len(dims) or any(d != s for d, s in zip(dims, shape) if type(d) is int):
            raise _bad(f"input '{name}' has shape {shape}, model '{sig.name}' expects {vshape} (-1: any size)")
        count = 1
        for d in shape:
            count *= d
        ip = inp.get("parameters") or {}
        if not isinstance(ip, dict):
            raise _bad(f"input '{name}': 'parameters' must be a JSON object")
        if "binary_data_size" in ip:
            size = ip["binary_data_size"]
            if type(size) is not int or size < 0 or offset + size > len(body):
                raise _bad(f"input '{name}': binary_data_size {size} runs past the end of the body; "
                           f"send {HEADER_LENGTH} and the raw tensor bytes after the JSON")
            if size != count * npdt.itemsize:
                raise _bad(f"input '{name}': binary_data_size {size} bytes does not hold shape {shape} of {dt} "
                           f"({count * npdt.itemsize} bytes)")
            arr = np.frombuffer(body, dtype=npdt.newbyteorder("<"), count=count, offset=offset).astype(npdt, copy=False)
            offset += size
        elif "data" in inp:
            try:
                arr = np.asarray(inp["data"], dtype=npdt)
            except (ValueError, TypeError, OverflowError):
                raise _bad(f"input '{name}': 'data' is not a (nested) list of {dt} values") from None
            if arr.size != count:
                raise _bad(f"input '{name}': 'data' has {arr.size} elements, shape {shape} needs {count}")
        else:
            raise _bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        arrays[name] = arr.reshape(shape)
    if offset != len(body):
        raise _bad(f"the body has {len(body) - offset} bytes after the JSON and binary inputs; "
                   "check binary_data_size and Inference-Header-Content-Length")
    if len(arrays) != len(sig.order):
        missing = next(n for n in sig.order if n not in arrays)
        raise _bad(f"missing input '{missing}'; model '{sig.name}' takes {sig.describe()}")
    batch = 1
    if sig.max_batch_size > 0:
        sizes = {a.shape[0] for a in arrays.values()}
        if len(sizes) != 1:
            raise _bad(f"inputs have different batch sizes {sorted(sizes)}; axis 0 is the batch axis of every input")
        batch = sizes.pop()
        if batch == 0:
            raise _bad("batch size 0: send at least one sample")
        if batch > sig.max_batch_size:
            raise _bad(f"batch {batch} exceeds model '{sig.name}' max_batch_size {sig.max_batch_size}; "
                       "split the request")
    outputs: list[tuple[str, bool]] = []
    classification: dict[str, int] = {}
    for o in req.get("outputs") or ():
        if not isinstance(o, dict) or o.get("name") not in sig.outputs:
            n = o.get("name") if isinstance(o, dict) else o
            raise _bad(f"model '{sig.name}' has no output '{str(n)[:64]}'; its outputs are "
                       f"{', '.join(sorted(sig.outputs))}")
        op = o.get("parameters") or {}
        if not isinstance(op, dict):
            raise _bad(f"output '{o['name']}': 'parameters' must be a JSON object")
        k = op.get("classification")
        if k is not None:
            if type(k) is not int or k < 1:
                raise _bad(f"output '{o['name']}': parameters.classification (class_count) must be a positive integer")
            classification[o["name"]] = k
        outputs.append((o["name"], bool(op.get("binary_data", False))))
    timeout = params.get("timeout")
    if timeout is not None and (type(timeout) not in (int, float) or timeout <= 0):
        raise _bad("parameters.timeout must be a positive number of microseconds")
    rid = req.get("id")
    return InferRequest(arrays, batch, outputs, bool(params.get("binary_data_output", False)),
                        None if rid is None else str(rid), timeout, classification)


def classify(a: np.ndarray, k: int, batched: bool = True) -> np.ndarray:
    """Triton's classification extension: the top ``k`` entries of each sample's scores (all axes but
    the batch axis flattened), as ``"score:index"`` byte strings, shape ``(batch, k)`` (``(k,)``
    without a batch axis), best first.

    Raises:
        RequestError: a non-numeric output.
    """
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.number):
        raise _bad(f"classification needs a numeric output; this one is {a.dtype}")
    rows = a.reshape(len(a), -1) if batched and a.ndim else a.reshape(1, -1)
    k = min(k, rows.shape[1])
    idx = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    out = np.array([[f"{float(r[j]):f}:{int(j)}".encode() for j in row] for r, row in zip(rows, idx)], dtype=object)
    return out if batched and a.ndim else out[0]


def _bytes_blob(a: np.ndarray) -> bytes:
    """BYTES tensor in the binary extension's layout: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(len(x).to_bytes(4, "little") + x for x in a.ravel())


def encode_infer_response(model_name: str, request: InferRequest, outputs: Mapping[str, np.ndarray],
                          output_order: Sequence[str]) -> tuple[bytes, int | None]:
    """Encode an ``/infer`` response.

    Args:
        model_name: the served model's name.
        request: the decoded request (which outputs, binary or JSON, the id).
        outputs: output name -> numpy array for this request only.
        output_order: the model's output names (order of the response when all are returned).

    Returns:
        ``(body, header_length)``: ``header_length`` is the JSON size in bytes when binary outputs
        follow it (send it as ``Inference-Header-Content-Length``), else ``None``.
    """
    wanted = request.outputs or [(n, request.binary_output) for n in output_order]
    res: dict[str, Any] = {"model_name": model_name, "model_version": "1"}
    if request.id is not None:
        res["id"] = request.id
    tensors = []
    blobs: list[bytes] = []
    for name, binary in wanted:
        a = np.asarray(outputs[name])
        if name in request.classification:
            a = classify(a, request.classification[name])
            t: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": list(a.shape)}
            if binary or request.binary_output:
                b = _bytes_blob(a)
                t["parameters"] = {"binary_data_size": len(b)}
                blobs.append(b)
            else:
                t["data"] = [x.decode() for x in a.ravel()]
            tensors.append(t)
            continue
        t = {"name": name, "datatype": NUMPY_TO_V2.get(a.dtype.name) or v2_datatype(a.dtype), "shape": list(a.shape)}
        if binary or request.binary_output:
            b = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
            t["parameters"] = {"binary_data_size": len(b)}
            blobs.append(b)
        else:
            t["data"] = np.ascontiguousarray(a).ravel()
        tensors.append(t)
    res["outputs"] = tensors
    try:
        head = orjson.dumps(res, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # a dtype orjson does not serialize natively
        for t in tensors:
            if "data" in t:
                t["data"] = t["data"].tolist()
        head = orjson.dumps(res)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def model_metadata(model: Any) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the protocol's model metadata (name, versions, platform, inputs,
    outputs; shapes with ``-1`` for dynamic dims, the batch axis included)."""
    return {
        "name": model.name, "versions": [str(model.source.get("version") or "1")], "platform": model.platform,
        "inputs": [{"name": t.name, "datatype": v2_datatype(t.dtype), "shape": v2_shape(t.dims)} for t in model.inputs],
        "outputs": [{"name": t.name, "datatype": v2_datatype(t.dtype), "shape": v2_shape(t.dims)} for t in model.outputs],
    }


def model_config(model: Any, batching: Mapping[str, Any]) -> dict[str, Any]:
    """``GET /v2/models/{name}/config``: a Triton-style model configuration (the model configuration
    extension), ``dims`` without the batch axis when ``max_batch_size > 0`` as Triton does, plus the
    dynamic-batching settings and deepship's own facts (variant, format, precision, provider) under
    ``parameters``."""
    strip = 1 if model.max_batch_size > 0 else 0

    def io(t):
        return {"name": t.name, "data_type": TRITON_CONFIG_TYPES.get(v2_datatype(t.dtype), "TYPE_INVALID"),
                "dims": v2_shape(t.dims)[strip:]}

    cfg = {"name": model.name, "platform": model.platform, "backend": model.backend,
           "max_batch_size": model.max_batch_size,
           "input": [io(t) for t in model.inputs], "output": [io(t) for t in model.outputs],
           "parameters": {k: {"string_value": str(v)} for k, v in model.source.items() if k != "artifact"}}
    if batching.get("dynamic_batching") and model.max_batch_size > 0:
        cfg["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(batching["max_queue_delay_ms"] * 1000),
            "default_queue_policy": {"max_queue_size": batching["max_queue_size"], "timeout_action": "REJECT",
                                     "default_timeout_microseconds": int(batching["timeout_s"] * 1e6)},
        }
    return cfg
