"""Shared test set-up: an isolated artifact cache per test process, quiet libraries, small helpers."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

# every test process gets its own cache: tests never read or write the user's .deepship-cache
os.environ["DEEPSHIP_CACHE"] = tempfile.mkdtemp(prefix="deepship-test-cache-")
os.environ.setdefault("DEEPSHIP_THREADS", "1")
# ... except the synthesized speech corpus: deterministic data keyed by its recipe, built once per
# machine and shared by the test workers (a file lock makes concurrent workers build it once)
os.environ.setdefault("DEEPSHIP_SPEECH_CACHE", str(Path(tempfile.gettempdir()) / "deepship-test-speech"))
warnings.filterwarnings("ignore")
logging.getLogger("torch").setLevel(logging.ERROR)

FIXTURES = Path(__file__).parent / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))


@pytest.fixture(scope="session")
def zoo_ctx():
    """``zoo_ctx(name)`` -> a cached :class:`ModelContext` for a zoo model (packaged weights)."""
    from deepship import api

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = api.load(name)
        return cache[name]

    return get


@pytest.fixture
def cli():
    """Run the ``optimize`` CLI in-process; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from deepship.cli import app

    runner = CliRunner()

    def run(*args: str):
        res = runner.invoke(app, [str(a) for a in args])
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        return res.exit_code, res.stdout, res.stderr

    return run


@pytest.fixture(scope="session")
def heldout_lm_loss():
    """``heldout_lm_loss(model)`` -> mean next-token cross-entropy (nats) of a language model
    (``model(ids)[0]`` = logits ``(batch, seq, vocab)``) on the first 8 x 33 held-out tokens of the
    GPT's corpus: the learning check of the tiny GPT and Mamba recipes."""
    import torch

    from deepship.models import gpt as G

    held = G.corpus()[1][: 8 * 33].reshape(8, 33)
    x, y = torch.from_numpy(held[:, :-1]), torch.from_numpy(held[:, 1:])

    def loss(model) -> float:
        with torch.no_grad():
            logits = model(x)[0]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))

    return loss
