"""The zoo and the loaders for the user's own models.

:func:`resolve` turns any model reference into a :class:`ModelSpec`:

- a zoo name (``mlp``, ``cnn``, ``lstm``, ``gru``);
- ``package.module:factory`` (with ``inputs`` and optional ``weights``);
- a ``.pt2`` file from ``torch.export.save``;
- an ``.onnx`` file;
- ``hf:PATH``: a local Hugging Face model folder (``save_pretrained``), exported through Optimum.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from ..errors import UnknownModelError
from .spec import Dataset, Metric, ModelSpec, Split, TensorSpec, parse_input_spec  # noqa: F401


def __getattr__(name: str) -> Any:
    # the zoo imports torch: load it on first use only
    if name in ("ZOO", "DEFAULT_SET"):
        from . import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module 'deepship.models' has no attribute {name!r}")


def zoo_names() -> list[str]:
    from .zoo import ZOO

    return list(ZOO)


def resolve(ref: str, inputs: Sequence[str | TensorSpec] | None = None, weights: str | None = None,
            data: str | None = None, metric: str | None = None, output_names: Sequence[str] | None = None,
            evaluate: Callable[[Any], float] | None = None) -> ModelSpec:
    """Resolve a model reference to a :class:`ModelSpec`.

    Raises:
        UnknownModelError: not a zoo name, ``hf:PATH``, ``module:factory``, ``.pt2`` or ``.onnx`` (lists
            the zoo), or an ``hf:`` path that is not a Hugging Face model folder.
        WeightsError, InputSpecError, ArtifactError, DataError: from the loaders.
    """
    from . import user
    from .zoo import ZOO

    if ref in ZOO:
        if weights or inputs:
            spec = ZOO[ref]()
            if weights:
                spec = spec.replace(weights_path=weights, extra={**spec.extra, "user_weights": True})
            return user.attach_data(spec, data, metric, evaluate) if (data or evaluate) else spec
        spec = ZOO[ref]()
    elif ref.startswith("hf:"):
        from .hf import resolve_hf

        spec = resolve_hf(ref)
    elif ref.endswith(".onnx"):
        spec = user.onnx_spec(ref)
    elif ref.endswith(".pt2"):
        spec = user.pt2_spec(ref, inputs)
    elif user.is_factory_ref(ref):
        spec = user.factory_spec(ref, inputs or [], weights, output_names)
    else:
        raise UnknownModelError(f"unknown model '{ref}'; use a zoo name ({', '.join(ZOO)}), "
                                "hf:PATH (a Hugging Face model folder), package.module:factory, a .pt2 or an .onnx file")
    if data or metric or evaluate:
        spec = user.attach_data(spec, data, metric, evaluate)
    return spec
