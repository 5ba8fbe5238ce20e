"""The pipeline: stages behind one registry (:mod:`.stages`), the per-model context and its
content-addressed cache (:mod:`.context`, :mod:`.variants`), the comparator (:mod:`.parity`), the stage
implementations (:mod:`.export`, :mod:`.quantize`, :mod:`.engines`, :mod:`.prune`, :mod:`.distill`,
:mod:`.transformers`), the per-family adapters (:mod:`.arch`), evaluation, the report (:mod:`.report`)
and the CI gate (:mod:`.check`).

The stage modules register themselves when imported; the registry imports them on its first lookup
(:data:`deepship.pipeline.stages.BUILTIN_MODULES`), so reading a report or serving a variant does not
load torch.
"""
