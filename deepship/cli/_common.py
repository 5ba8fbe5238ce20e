"""What every ``optimize`` command shares: the Typer app, the consoles, the one-line error contract,
the model and data options, and loading a model with your data."""
from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import EXIT_USER_ERROR, DeepshipError, InputSpecError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="deepship: export, quantize, build engines, benchmark and report trained models.")
out = Console()
err = Console(stderr=True)

MODEL_HELP = "zoo name (mlp, cnn, lstm, gru, gpt, asr, ...), package.module:factory, a .pt2 or an .onnx file"
INPUT_HELP = "input spec NAME:DTYPE[dims], dims named for dynamic (x:float32[batch,3,32,32]); repeat per input"

# the model and data options (one OptionInfo each, shared by every command that takes them)
INPUTS: List[str] = typer.Option(None, "--input", help=INPUT_HELP)
WEIGHTS: Optional[str] = typer.Option(None, "--weights", help="safetensors or torch state_dict checkpoint")
DATA: Optional[str] = typer.Option(None, "--data", help=".npz to evaluate on: one array per input (or inputs/x/X) "
                                   "and targets/labels/y")
TRAIN_DATA: Optional[str] = typer.Option(None, "--train-data", help="labeled .npz to fine-tune on (after pruning, for "
                                         "distillation; the generic supervised recipe for your own model)")
CALIBRATION_DATA: Optional[str] = typer.Option(None, "--calibration-data", help=".npz of calibration samples for "
                                               "INT8 (default: training data, else a hold-out of --data)")
NAME: Optional[str] = typer.Option(None, "--name", help="the model's name in reports and file names")
# the timing options of the commands that measure a sweep of variants
BATCHES: str = typer.Option("1,32", help="comma-separated batch sizes to time")
THREADS: Optional[int] = typer.Option(None, help="intra-op threads (default: all cores)")
MIN_TIME: float = typer.Option(0.5, help="minimum timed seconds per variant and batch")
METRIC: Optional[str] = typer.Option(None, "--metric", help="accuracy | mae | mse (with --data; default from the "
                                     "targets' dtype)")


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", help="keep the libraries' log lines and warnings")):
    """deepship: export, quantize, build engines, benchmark and report trained models."""
    if verbose:
        os.environ["DEEPSHIP_VERBOSE"] = "1"


def quiet_libraries() -> None:
    """Keep torch's, onnxscript's and the exporter's log lines and warnings off stderr (``--verbose``
    keeps them)."""
    if os.environ.get("DEEPSHIP_VERBOSE"):
        return
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "torch._export", "torch.export", "torch.utils._pytree", "onnxscript", "torchao",
                 "bitsandbytes", "peft", "root"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger().setLevel(logging.ERROR)


def say_error(message: str) -> None:
    """``error: MESSAGE`` on stderr as one line (brackets and other markup printed as they are)."""
    err.print(f"[red]error:[/red] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)


#: notes on the data (which arrays were used, how it was split), printed when the command succeeds
_NOTES: list[str] = []


def user_errors(fn):
    """Print a :class:`DeepshipError` as one line and exit 2, with no traceback (and nothing else on
    stderr: the data notes gathered by :func:`load` are printed only when the command succeeds)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        quiet_libraries()
        _NOTES.clear()
        try:
            res = fn(*a, **kw)
        except DeepshipError as e:
            _NOTES.clear()
            say_error(str(e))
            raise typer.Exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)
        for line in _NOTES:
            note(line)
        _NOTES.clear()
        return res

    return wrapper


def note(text: str) -> None:
    """A line for the user on stderr (not part of machine output), printed as it is."""
    err.print(text, highlight=False, markup=False, soft_wrap=True)


def load(model: str, inputs=None, weights=None, data=None, metric=None, retrain=False, train_data=None,
         calibration_data=None, name=None):
    """:func:`deepship.api.load`; its notes on the data (which arrays were used, how it was split, no
    targets) go to stderr when the command succeeds."""
    from .. import api

    ctx = api.load(model, inputs=inputs or None, weights=weights, data=data, metric=metric, retrain=retrain,
                   train_data=train_data, calibration_data=calibration_data, name=name)
    _NOTES.extend(f"data: {line}" for line in ctx.spec.extra.get("data_notes", ()))
    return ctx


def stem(ref: str, name: str | None = None) -> str:
    """A file-name stem for a model reference: ``--name``, else ``cnn``, ``model`` for
    ``dir/model.onnx``, the folder name for ``hf:PATH``, the factory name for ``package.module:factory``."""
    if name:
        return name
    if ref.endswith((".pt2", ".onnx")):
        return Path(ref).stem
    if ref.startswith("hf:"):
        return Path(ref[3:].rstrip("/")).name or "hf-model"
    return ref.split(":")[-1]


def batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,32"`` -> ``(1, 32)``.

    Raises:
        InputSpecError: not comma-separated positive integers.
    """
    try:
        bs = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise InputSpecError(f"bad --batches '{text}'; give comma-separated integers like 1,32") from None
    if any(b < 1 for b in bs):
        raise InputSpecError(f"bad --batches '{text}'; batch sizes are positive integers, like 1,32")
    return bs


def csv(text: str | None) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]`` (empty for ``None``)."""
    return [x.strip() for x in text.split(",") if x.strip()] if text else []
