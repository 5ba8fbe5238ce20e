"""Prometheus metrics of the serving process (prometheus-client), served at ``GET /metrics``.

| metric | type | labels | meaning |
|---|---|---|---|
| ``deepship_requests_total`` | counter | model, status | inference requests answered, by HTTP status |
| ``deepship_request_duration_seconds`` | histogram | model | time from request received to response ready, s |
| ``deepship_queue_duration_seconds`` | histogram | model | time a request waited in the batcher queue, s |
| ``deepship_compute_duration_seconds`` | histogram | model | run time of one executed batch, s |
| ``deepship_batch_size`` | histogram | model | samples per executed batch |
| ``deepship_queue_depth`` | gauge | model | requests waiting in the queue now |
| ``deepship_model_ready`` | gauge | model | 1 when the model is loaded and warm |

Each server owns its own :class:`prometheus_client.CollectorRegistry`, so several servers (tests)
live in one process. Requests naming an unknown or invalid model are counted under
``model="unknown"``: labels never take values from the client.
"""
from __future__ import annotations

from typing import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    """The server's metrics.

    Args:
        models: served model names (their children are created up front so every series exists
            from the first scrape).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, models: Iterable[str]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("deepship_requests", "Inference requests answered, by HTTP status.",
                                ["model", "status"], registry=r)
        self.latency = Histogram("deepship_request_duration_seconds",
                                 "Time from request received to response ready, seconds.", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("deepship_queue_duration_seconds", "Time waited in the batcher queue, seconds.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("deepship_compute_duration_seconds", "Run time of one executed batch, seconds.",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("deepship_batch_size", "Samples per executed batch.", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("deepship_queue_depth", "Requests waiting in the queue.", ["model"], registry=r)
        self.ready = Gauge("deepship_model_ready", "1 when the model is loaded and warm.", ["model"], registry=r)
        self._children: dict[tuple[str, str], object] = {}
        for m in models:
            self.ready.labels(m).set(1)
            self.queue_depth.labels(m).set(0)
            self.requests.labels(m, "200")
            self.batch_size.labels(m)
            self.latency.labels(m)

    def _child(self, metric, key: tuple[str, ...]):
        k = (id(metric),) + key
        c = self._children.get(k)
        if c is None:
            c = self._children[k] = metric.labels(*key)
        return c

    def request(self, model: str, status: int, seconds: float) -> None:
        """Count one answered request and observe its latency (seconds)."""
        self._child(self.requests, (model, str(status))).inc()
        self._child(self.latency, (model,)).observe(seconds)

    def observer(self, model: str):
        """An ``observe(event, **values)`` callback for :class:`~deepship.serving.batcher.DynamicBatcher`."""
        depth = self._child(self.queue_depth, (model,))
        bs = self._child(self.batch_size, (model,))
        comp = self._child(self.compute, (model,))
        qt = self._child(self.queue_time, (model,))

        def observe(event: str, **kw) -> None:
            if event == "depth":
                depth.set(kw["depth"])
            elif event == "batch":
                bs.observe(kw["size"])
                comp.observe(kw["compute_s"])
            elif event == "queue":
                qt.observe(kw["wait_s"])

        return observe

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
