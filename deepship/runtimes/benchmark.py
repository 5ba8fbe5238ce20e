"""The latency harness: warm-up, repeated timed runs, p50/p90/p99 and throughput.

One harness times every runtime (torch eager, ONNX Runtime, engines) through the :class:`Session`
interface, so numbers are comparable. Thread count is fixed by the session and recorded.
Timings under about 0.1 ms vary by up to 50% between runs on shared machines: the harness runs
for at least ``min_time_s`` and at least ``min_iters`` times, and the report quotes medians.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np

from .session import Session


@dataclass
class LatencyStats:
    """Latency of one (session, batch size) pair.

    Attributes:
        batch: batch size (samples per call).
        iters: timed calls.
        p50_ms, p90_ms, p99_ms, mean_ms: per-call latency in milliseconds.
        throughput: samples per second at the median latency (``batch / p50``).
        threads: intra-op threads the session used.
    """

    batch: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure(session: Session, feeds: Mapping[str, np.ndarray], warmup: int = 5, min_iters: int = 20,
            max_iters: int = 2000, min_time_s: float = 0.5, batch: int | None = None) -> LatencyStats:
    """Time ``session.run(feeds)``.

    Runs ``warmup`` untimed calls, then timed calls until both ``min_iters`` calls and ``min_time_s``
    seconds are reached (at most ``max_iters``). Wall-clock per call with ``time.perf_counter``.

    Returns:
        :class:`LatencyStats` (milliseconds; throughput in samples/s).
    """
    for _ in range(warmup):
        session.run(feeds)
    times: list[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        session.run(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(times)
    b = batch if batch is not None else len(next(iter(feeds.values())))
    p50 = float(np.percentile(a, 50))
    return LatencyStats(b, len(a), p50, float(np.percentile(a, 90)), float(np.percentile(a, 99)), float(a.mean()),
                        b / (p50 / 1e3) if p50 > 0 else float("inf"), session.threads)


def measure_batches(session: Session, make_feeds: Callable[[int], Mapping[str, np.ndarray]],
                    batches: tuple[int, ...] = (1, 32), **kw) -> dict[int, LatencyStats]:
    """:func:`measure` at each batch size; ``make_feeds(batch)`` builds the inputs."""
    return {b: measure(session, make_feeds(b), batch=b, **kw) for b in batches}


def plain_loop_ms(fn: Callable[[], object], warmup: int = 5, min_iters: int = 20, min_time_s: float = 0.5) -> float:
    """Median milliseconds of ``fn()`` in a bare ``time.perf_counter`` loop: the reference the harness
    is checked against (no Session, no feeds conversion). ``warmup`` untimed calls first."""
    for _ in range(warmup):
        fn()
    ts: list[float] = []
    t_end = time.perf_counter() + min_time_s
    while len(ts) < min_iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))
