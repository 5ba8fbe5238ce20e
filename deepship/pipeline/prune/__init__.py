"""Pruning as pipeline stages (torch -> torch), and the sparsity sweep.

| module | what |
|---|---|
| :mod:`.torch_pruning` | structured (torch-pruning) and unstructured (``torch.nn.utils.prune``) pruning of an ``nn.Module`` |
| :mod:`.archs` | the :class:`ArchSupport` registry: how a module class is read and shrunk |
| :mod:`.stages` | the ``prune`` stages, fine-tuning, names, chains and report notes |
| :mod:`.sweep` | ``optimize prune``'s sweep, measuring and publishing variants |

| method | library | what it removes | what it speeds up |
|---|---|---|---|
| ``structured`` | torch-pruning (``DependencyGraph`` + ``MetaPruner``, Fang et al. 2023, "DepGraph: Towards Any Structural Pruning") | whole channels (Conv), hidden units (Linear, LSTM/GRU/RNN): the layers get physically smaller | dense latency and size, in every runtime |
| ``unstructured`` | ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``, then ``prune.remove`` | single weights, set to zero (global magnitude ranking over all weight matrices) | **only the compressed size** (gzip): the tensors stay dense, so size on disk and latency do not change |

Both are followed by a short fine-tune on the model's own training data (the spec's seeded recipe
with ``epochs`` derived from ``finetune_steps`` and half its learning rate); unstructured masks stay
attached during the fine-tune, so pruned weights stay zero, and are made permanent afterwards.

Importance criteria (``importance=``): ``l2`` (default) or ``l1``: the group magnitude of
torch-pruning's ``MagnitudeImportance(p)``: the L_p norm of every weight that belongs to a channel,
summed over each layer the channel touches (its outgoing Conv/Linear rows, incoming columns of the
next layer, and for LSTM/GRU the rows of every gate in ``weight_ih``/``weight_hh`` plus the
``weight_hh`` column), averaged over the group and mean-normalized. Unstructured pruning ranks single
weights by ``|w|`` (L1 and L2 rank single weights identically).

``sparsity`` means, for ``structured``, the fraction of channels / hidden units removed from every
prunable layer (torch-pruning's ``pruning_ratio``; the parameter count falls faster, about
``1 - (1 - s)^2`` for layers between two pruned ones); for ``unstructured``, the fraction of weights
(matrix entries, biases excluded) set to zero. Layers that produce a model output are never
shrunk (the output shape stays).

A pruned torch variant keeps its new architecture in ``Variant.info["arch"]`` when the zoo's
``build(arch)`` can express it (MLP hidden sizes, LeNet ``c1``/``c2``/``fc``, RNN ``hidden``);
otherwise it is saved as a ``torch.export`` program (``model.pt2``). Either way it flows on through
export -> quantize -> engine -> report like any torch variant.

Extension point (attention models): call :func:`register_architecture` for the module class with
``arch_of`` (architecture of a pruned instance, in the keys its spec's ``build(arch)`` takes),
``pruner_kwargs`` (extra ``MetaPruner`` arguments: ``num_heads={q/k/v Linear: n_heads}``,
``prune_num_heads=True``, ``head_pruning_ratio``, ``ignored_layers`` such as tied embeddings,
``output_transform``), ``prepare``/``finish`` hooks around the pruning and ``width_keys`` (keys
scaled when a distillation student is derived). The zoo's GPT decoder registers this way
(:mod:`deepship.pipeline.arch.gpt`: whole heads and MLP width).
"""
from __future__ import annotations

from .archs import ARCHS, ArchSupport, arch_of, arch_support, register_architecture  # noqa: F401
from .stages import (DEFAULT_FINETUNE_STEPS, FINETUNE_LR_FACTOR, REPORT_FINETUNE_STEPS, chain_entries,  # noqa: F401
                     example_args, export_method, finetune, parent_module, report_notes, save_torch_variant,
                     variant_name)
from .sweep import (measure_variants, parse_sparsities, prunable, publish_variants, rows_to_json,  # noqa: F401
                    sweep, sweep_markdown)
from .torch_pruning import (IMPORTANCE_CRITERIA, PRUNABLE_TYPES, PRUNE_METHODS, RNN_TYPES,  # noqa: F401
                            SINGLE_THREAD_TRAIN_PARAMS, count_nonzero, count_parameters, gzip_size, make_permanent,
                            output_layers, rnn_unit_norms, structured_prune, train_threads, unstructured_masks,
                            why_not_structured)
