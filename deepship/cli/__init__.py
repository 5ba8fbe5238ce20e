"""The ``optimize`` command: parses arguments and calls :mod:`deepship.api` (and :mod:`deepship.serving`).
Nothing else lives here. Each command imports what it uses when it runs, so ``optimize --help`` and
``optimize serve`` never load torch.

| module | commands |
|---|---|
| :mod:`.models` | ``models``, ``train``, ``export``, ``quantize``, ``engine``, ``prune``, ``distill`` |
| :mod:`.report` | ``report``, ``check``, ``cache ls``, ``cache clear`` |
| :mod:`.run` | ``serve``, ``generate``, ``asr bundle``, ``asr transcribe`` |
"""
from __future__ import annotations

from . import models, report, run  # noqa: F401  (the commands register with the app on import)
from ._common import app


def main() -> None:  # pragma: no cover
    app()
