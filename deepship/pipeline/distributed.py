"""``optimize report --ray``: the report's builds and measurements as Ray tasks.

Ray (https://docs.ray.io, ``ray.remote`` tasks, ``ray.wait``) schedules; deepship only decides what a
task is. For each model the variant tree splits into

- a **trunk** task: the baseline (training it first when the cache has no weights) and every
  variant that has children (``fp32-onnx``, a pruned model before its export, ...), built and measured
  once;
- one **leaf** task per remaining variant: its chain's ancestors come from the cache the trunk filled
  (content-addressed keys, so every task finds the same artifacts), the leaf is built, evaluated and
  timed. Leaf tasks wait for their model's trunk (its ``ObjectRef`` is their argument).

Artifacts travel through the cache folder (``$DEEPSHIP_CACHE``, passed to every worker as an absolute
path; on a multi-node cluster it must be a folder every node mounts at the same path, with deepship
installed in the same environment). Rows come back through the object store and are merged in plan
order, so the report (Pareto marks, speedups) is built exactly as the serial one.

Timing: every task asks Ray for ``threads`` CPUs (``num_cpus``), so the tasks running at once never
share a core and a row's latency is measured as in the serial run; on one 2-core machine with
``threads=2`` the tasks run one at a time, with ``threads=1`` two at a time.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

from ..errors import StageError
from ..models.spec import ModelSpec
from ..utils import cache_root

#: environment every task runs under (the cache, the threads default, the driver's import path)
_PASSED_ENV = ("DEEPSHIP_CACHE", "DEEPSHIP_THREADS", "DEEPSHIP_VERBOSE")


def split_chains(todo: Sequence[tuple]) -> tuple[list[str], list[str]]:
    """``(trunk, leaves)`` of a model's entries (see :func:`deepship.pipeline.report.model_todo`):
    the trunk is the baseline plus every entry some other entry names as parent; the leaves are the
    rest, in plan order."""
    parents = {e[4] for e in todo if e[1] is not None}
    trunk = [e[0] for e in todo if e[1] is None or e[0] in parents]
    return trunk, [e[0] for e in todo if e[0] not in trunk]


def _task(spec: ModelSpec, todo: list[tuple], measure: list[str], batches: list[int], threads: int,
          min_time_s: float, _after: Any = None) -> dict[str, Any]:
    """Inside a Ray worker: the rows of ``measure`` (ancestors built or loaded from the shared cache)."""
    import torch

    from .context import ModelContext
    from .report import model_rows

    torch.set_num_threads(threads)
    ctx = ModelContext(spec)
    t0 = time.perf_counter()
    rows = model_rows(ctx, todo, batches, threads, min_time_s, lambda name: None, set(measure))
    return {"rows": rows, "weights": ctx.weights_info, "node": os.uname().nodename, "pid": os.getpid(),
            "wall_s": round(time.perf_counter() - t0, 2)}


def _worker_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    env["DEEPSHIP_CACHE"] = str(cache_root().resolve())
    path = [p for p in sys.path if p and os.path.isdir(p)]  # user factories (package.module:factory) import there
    env["PYTHONPATH"] = os.pathsep.join(path + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return env


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None) -> Iterator[dict[str, Any]]:
    """Connect to the Ray cluster at ``address`` (``"auto"``, ``HOST:PORT``, ``ray://HOST:PORT``), or
    to ``$RAY_ADDRESS`` when ``address`` is None and it is set, else start a local one with
    ``num_cpus`` CPUs (default: all cores); shut down on exit what this call started. Yields
    ``{"address": ..., "cpus": N, "nodes": N}``.

    Ray clusters started with token authentication (``ray start`` writes ``~/.ray/auth_token``)
    need ``RAY_AUTH_MODE=token`` in the driver; it is set when a token is there and the variable is not.

    Raises:
        StageError: Ray is not installed or the cluster cannot be reached.
    """
    target = address or os.environ.get("RAY_ADDRESS")
    if target:  # read by Ray when it is imported
        token = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token)):
            os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise StageError("--ray needs Ray; install it with pip install 'deepship[ray]'") from None
    started = False
    if target and not ray.is_initialized():
        _probe(target)
    if not ray.is_initialized():
        kw: dict[str, Any] = {"runtime_env": {"env_vars": _worker_env()}, "log_to_driver": False,
                              "configure_logging": False}
        if not target:
            kw.update(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
        try:
            ray.init(address=target, **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            msg = " ".join(str(e).split())[:160]
            raise StageError(f"cannot reach the Ray cluster at {target or 'a new local cluster'} ({msg}); start "
                             "one with `ray start --head` and pass its address to --ray-address") from None
        started = True
    try:
        res = ray.cluster_resources()
        yield {"address": target or "local", "cpus": int(res.get("CPU", 0)),
               "nodes": sum(1 for k in res if k.startswith("node:") and k != "node:__internal_head__")}
    finally:
        if started:
            ray.shutdown()


def _probe(target: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at ``HOST:PORT`` (Ray itself retries for minutes)."""
    import socket

    hostport = target.split("://", 1)[-1]
    if target == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise StageError(f"cannot reach the Ray cluster at {target} ({type(e).__name__}: {e}); start one with "
                         "`ray start --head` and pass its address to --ray-address") from None


def run_on_ray(contexts: Sequence[Any], plans: Sequence[list[tuple]], batches: Sequence[int], threads: int,
               min_time_s: float, advance: Callable[[int, str], None]) -> list[dict[str, Any]]:
    """Run every model's trunk and leaf tasks on the connected Ray cluster (:func:`ray_cluster`) and
    return each model's rows in plan order with the trunk's ``weights`` info and where each task ran:
    ``[{"rows": [...], "weights": {...}, "tasks": [...]}, ...]``.

    ``contexts`` are the driver's :class:`ModelContext` (specs checked, nothing built), ``plans`` their
    :func:`model_todo` entries; ``advance(model index, variant)`` is called as rows arrive. A task
    that dies (worker crash, out of memory) gives failed rows naming the Ray error.
    """
    import ray

    task = ray.remote(num_cpus=threads, max_retries=0)(_task)
    pending: dict[Any, tuple[int, list[str], str]] = {}
    for i, (ctx, todo) in enumerate(zip(contexts, plans)):
        trunk, leaves = split_chains(todo)
        tref = task.remote(ctx.spec, [e for e in todo if e[0] in trunk], trunk, list(batches), threads, min_time_s)
        pending[tref] = (i, trunk, "trunk")
        for leaf in leaves:
            pending[task.remote(ctx.spec, _chain_of(todo, leaf), [leaf], list(batches), threads, min_time_s,
                                tref)] = (i, [leaf], "leaf")
    got: list[dict[str, dict]] = [{} for _ in contexts]
    weights: list[dict] = [{} for _ in contexts]
    tasks: list[list[dict]] = [[] for _ in contexts]
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        ref = done[0]
        i, names, kind = pending.pop(ref)
        try:
            res = ray.get(ref)
        except Exception as e:  # the task died: its rows say so, the other tasks go on
            why = " ".join(str(e).split())[:200]
            res = {"rows": [{"variant": n, "status": "failed", "error": f"Ray task failed: {why}"} for n in names]}
        for r in res["rows"]:
            got[i][r["variant"]] = r
            advance(i, r["variant"])
        if kind == "trunk":
            weights[i] = res.get("weights", {})
        tasks[i].append({"kind": kind, "variants": names, **{k: res[k] for k in ("node", "pid", "wall_s") if k in res}})
    return [{"rows": [got[i][e[0]] for e in todo if e[0] in got[i]], "weights": weights[i], "tasks": tasks[i]}
            for i, todo in enumerate(plans)]


def _chain_of(todo: Sequence[tuple], name: str) -> list[tuple]:
    """The entries from the baseline down to ``name``, in build order."""
    by = {e[0]: e for e in todo}
    chain, cur = [], by.get(name)
    while cur is not None:
        chain.append(cur)
        cur = by.get(cur[4]) if cur[1] is not None else None
    if todo and todo[0] not in chain:
        chain.append(todo[0])  # the baseline: always evaluated (drift reference)
    return chain[::-1]
