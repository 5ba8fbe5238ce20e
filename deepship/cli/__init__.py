"""The ``optimize`` command: parses arguments and calls :mod:`deepship.api` (and :mod:`deepship.serving`).
Nothing else lives here. Each command imports what it uses when it runs, so ``optimize --help`` and
``optimize serve`` never load torch.

| module | commands |
|---|---|
| :mod:`.models` | ``models``, ``train``, ``export``, ``quantize``, ``engine``, ``prune``, ``distill`` |
| :mod:`.report` | ``report``, ``check``, ``tune``, ``build``, ``cache ls``, ``cache clear`` |
| :mod:`.run` | ``serve``, ``generate``, ``asr bundle``, ``asr transcribe``, ``deploy triton`` |
"""
from __future__ import annotations

from . import models, report, run  # noqa: F401  (the commands register with the app on import)
from ..errors import EXIT_USER_ERROR
from ._common import app, say_error


def main() -> None:
    """The ``optimize`` entry point: a usage error (unknown option, a value of the wrong type) is one
    ``error:`` line and exit 2, like every other bad input."""
    try:  # typer >= 0.25 vendors click
        from typer._click import exceptions as ce
    except ImportError:  # pragma: no cover
        from click import exceptions as ce
    import typer

    try:
        rc = app(prog_name="optimize", standalone_mode=False)  # a command's typer.Exit comes back as its code
    except typer.Exit as e:
        raise SystemExit(e.exit_code) from None
    except ce.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:
            print(e.ctx.get_help())
            raise SystemExit(EXIT_USER_ERROR) from None
        cmd = e.ctx.command_path if e.ctx is not None else "optimize"
        say_error(f"{e.format_message().rstrip('.')}; see {cmd} --help")
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    raise SystemExit(rc if isinstance(rc, int) else 0)
