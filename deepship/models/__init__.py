"""The zoo and the loaders for the user's own models.

:func:`resolve` turns any model reference into a :class:`ModelSpec`:

- a zoo name (``mlp``, ``cnn``, ``lstm``, ``gru``);
- ``package.module:factory`` (with ``inputs`` and optional ``weights``);
- a ``.pt2`` file from ``torch.export.save``;
- an ``.onnx`` file;
- ``hf:PATH``: a local Hugging Face model folder (``save_pretrained``), exported through Optimum.
"""
from __future__ import annotations

import re
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
            evaluate: Callable[[Any], float] | None = None, train_data: str | None = None,
            calibration_data: str | None = None, name: str | None = None) -> ModelSpec:
    """Resolve a model reference to a :class:`ModelSpec`, with your data attached
    (:func:`deepship.models.userdata.attach_data`: ``data`` to evaluate on, ``train_data`` to fine-tune
    on, ``calibration_data`` for INT8 calibration) and ``name`` as its report name.

    Raises:
        UnknownModelError: not a zoo name, ``hf:PATH``, ``module:factory``, ``.pt2`` or ``.onnx`` (lists
            the zoo), or an ``hf:`` path that is not a Hugging Face model folder.
        WeightsError, InputSpecError, ArtifactError, DataError: from the loaders.
    """
    from . import user, userdata  # torch: loaded only when a model is resolved
    from .zoo import ZOO

    if ref in ZOO:
        spec = ZOO[ref]()
        if weights:
            spec = spec.replace(weights_path=weights, extra={**spec.extra, "user_weights": True})
    elif ref.startswith("hf:"):
        from .hf import resolve_hf  # transformers

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
    if name:
        if not re.match(r"^[A-Za-z0-9][\w.-]{0,63}$", name):
            raise UnknownModelError(f"bad --name '{name}'; use letters, digits, '.', '_' or '-' (at most 64)")
        spec = spec.replace(name=name)
    if data or metric or evaluate or train_data or calibration_data:
        spec = userdata.attach_data(spec, data, metric, evaluate, train_data=train_data,
                                    calibration_data=calibration_data)
    return spec
