"""One inference interface over every runtime (the Polygraphy "runner" idea).

A :class:`Session` takes a dict ``input name -> numpy array`` and returns a dict
``output name -> numpy array``. Implementations: :class:`TorchSession` (eager PyTorch, FP32 or
BF16 autocast-free casting) and :class:`OrtSession` (ONNX Runtime, any execution provider, with the
provider that actually runs recorded, since ONNX Runtime falls back to the CPU silently).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ArtifactError, InputSpecError
from ..utils import check_onnx_file, default_threads, first_line


class Session:
    """Base class. Subclasses set ``input_names``, ``output_names``, ``runtime``, ``provider``.

    Attributes:
        runtime: ``"torch"``, ``"onnxruntime"``, ...
        provider: the device/provider that runs the model (``"cpu"``, ``"CPUExecutionProvider"``, ...).
        threads: intra-op thread count used (recorded in the report).
    """

    runtime = "base"
    provider = "cpu"
    threads = 1
    input_names: list[str] = []
    output_names: list[str] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def run_batched(self, feeds: Mapping[str, np.ndarray], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Run over arrays whose first axis is the sample axis, ``batch_size`` samples at a time."""
        n = len(next(iter(feeds.values())))
        outs: dict[str, list[np.ndarray]] = {}
        for i in range(0, n, batch_size):
            res = self.run({k: v[i:i + batch_size] for k, v in feeds.items()})
            for k, v in res.items():
                outs.setdefault(k, []).append(v)
        return {k: np.concatenate(v) for k, v in outs.items()}


class TorchSession(Session):
    """Eager PyTorch.

    Args:
        module: an ``nn.Module`` (or a callable) taking the inputs positionally in ``input_names`` order.
        input_names, output_names: names for the feed and result dicts.
        dtype: ``torch.float32`` or ``torch.bfloat16``: floating inputs are cast to it and outputs
            cast back to float32 (the BF16 variant runs on AMX tile units where the CPU has them).
        device: ``"cpu"`` or ``"cuda"``.
    """

    runtime = "torch"

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Sequence[str],
                 dtype: Any = None, device: str = "cpu", threads: int | None = None):
        import torch

        self.torch = torch
        self.module = module
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.dtype = dtype or torch.float32
        self.device = device
        self.provider = device
        self.threads = threads or default_threads()
        torch.set_num_threads(self.threads)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        if torch.get_num_threads() != self.threads:  # the count is process-wide: another session (or a
            torch.set_num_threads(self.threads)      # fine-tune at 1 thread) may have changed it since
        args = []
        for n in self.input_names:
            if n not in feeds:
                raise InputSpecError(f"missing input '{n}'; the model takes {', '.join(self.input_names)}")
            t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
            if t.is_floating_point():
                t = t.to(self.dtype)
            args.append(t)
        with torch.inference_mode():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, dict):
            out = tuple(out.values())
        res = {}
        for name, o in zip(self.output_names, out):
            if o.is_floating_point():
                o = o.float()
            res[name] = o.cpu().numpy()
        return res


_OPT_LEVELS = ("all", "extended", "basic", "disabled")


def session_options(graph_optimization_level: str = "all", threads: int | None = None):
    """``onnxruntime.SessionOptions`` as deepship runs every ONNX Runtime session: ``threads``
    intra-op threads (default :func:`default_threads`), 1 inter-op thread, errors-only logging, and the
    graph optimization level ``"all"``, ``"extended"``, ``"basic"`` or ``"disabled"``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[graph_optimization_level]
    return so


class OrtSession(Session):
    """ONNX Runtime inference session.

    Args:
        path: the ``.onnx`` file (external data beside it).
        providers: execution providers in priority order (default CPU).
        threads: intra-op threads (default :func:`default_threads`).
        graph_optimization_level: ``"all"``, ``"extended"``, ``"basic"`` or ``"disabled"``.
        options: extra ``SessionOptions`` attributes.
        model: an ``onnx.ModelProto`` built in memory (e.g. by
            :func:`deepship.exporters.kv.greedy_proposer`) to run instead of the file at ``path``; its
            external data is read from ``path``'s folder.

    ``provider`` records the provider that actually runs (``session.get_providers()[0]``).

    Raises:
        ArtifactError: missing or corrupt model, missing external data.
    """

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None,
                 graph_optimization_level: str = "all", options: Mapping[str, Any] | None = None,
                 model: Any = None):
        import onnxruntime as ort

        if model is None:
            check_onnx_file(path)
        self.threads = threads or default_threads()
        so = session_options(graph_optimization_level, self.threads)
        for k, v in (options or {}).items():
            setattr(so, k, v)
        source: Any = str(path)
        if model is not None:  # built in memory: external data resolves against path's folder
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(Path(path).resolve().parent))
            source = model.SerializeToString()
        try:
            self.sess = ort.InferenceSession(source, so, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:
            msg = first_line(e, 200)
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {msg}") from None
        self.path = str(path)
        self.provider = self.sess.get_providers()[0]
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self._in_types = {i.name: i.type for i in self.sess.get_inputs()}
        self._in_shapes = {i.name: i.shape for i in self.sess.get_inputs()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for n in self.input_names:
            if n not in feeds:
                raise InputSpecError(f"missing input '{n}'; the model takes {', '.join(self.input_names)}")
        f = {n: self._fit_empty(n, np.ascontiguousarray(feeds[n])) for n in self.input_names}
        try:
            outs = self.sess.run(self.output_names, f)
        except Exception:
            shapes = ", ".join(f"{n}{list(a.shape)}:{a.dtype}" for n, a in f.items())
            want = ", ".join(f"{n}{self._in_shapes[n]}:{self._in_types[n]}" for n in self.input_names)
            raise InputSpecError(f"ONNX Runtime rejected inputs {shapes}; the model expects {want}") from None
        return dict(zip(self.output_names, outs))

    def _fit_empty(self, name: str, a: np.ndarray) -> np.ndarray:
        """An empty state input (zero elements, e.g. a zero-length KV cache) takes the graph's static
        dims: a pruned decoder has fewer heads than the empty past its model's data was made for."""
        shape = self._in_shapes.get(name)
        if a.size or not shape or len(shape) != a.ndim:
            return a
        want = tuple(d if isinstance(d, int) else n for d, n in zip(shape, a.shape))
        return a if want == a.shape else np.zeros(want, a.dtype)


def open_onnx(path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None) -> Session:
    """An :class:`OrtSession` of an ``.onnx`` file; for the fused-attention decoder graph
    (:mod:`deepship.exporters.fused`) a :class:`~deepship.runtimes.kvpool.FusedSession` over it, which
    gives it the plain decoder interface every other decoder variant has.

    Raises:
        ArtifactError: as :class:`OrtSession`.
    """
    from .kvpool import FusedSession, is_fused

    s = OrtSession(path, providers=providers, threads=threads)
    return FusedSession(s) if is_fused(s.input_names) else s
