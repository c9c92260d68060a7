"""Prometheus metrics of ``gradmap serve`` (``GET /metrics``).

    gradmap_requests_total{endpoint, model, status}     answers, by HTTP status
    gradmap_request_duration_seconds{endpoint}          latency histogram, arrival to answer
    gradmap_batch_size{model}                           pictures per model run (dynamic batching)
    gradmap_batch_duration_seconds{model}               seconds per model run
    gradmap_queue_depth{model}                          pictures waiting for a batch
    gradmap_failures_total{reason}                      refused or failed requests, by reason

With several worker processes, prometheus_client's multiprocess mode sums them: each process keeps
its values in memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR``, which the supervisor puts on a
tmpfs (``/dev/shm``) where there is one, so that no request writes to disk.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The server's metrics, in a registry of their own (or the multiprocess files)."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # In multiprocess mode the values live in the shared files and /metrics collects them anew.
        self.registry = None if self.multiprocess else CollectorRegistry()
        kw = {"registry": self.registry}
        self.requests = Counter("gradmap_requests", "HTTP answers by endpoint, model and status",
                                ["endpoint", "model", "status"], **kw)
        self.latency = Histogram("gradmap_request_duration_seconds", "Seconds from a request's arrival to its answer",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, **kw)
        self.batch_size = Histogram("gradmap_batch_size", "Pictures per model run", ["model"],
                                    buckets=_BATCH_BUCKETS, **kw)
        self.batch_seconds = Histogram("gradmap_batch_duration_seconds", "Seconds per model run", ["model"],
                                       buckets=_LATENCY_BUCKETS, **kw)
        self.queue_depth = Gauge("gradmap_queue_depth", "Pictures waiting for a batch", ["model"],
                                 multiprocess_mode="livesum", **kw)
        self.failures = Counter("gradmap_failures", "Requests refused or failed, by reason", ["reason"], **kw)

    def exposition(self) -> bytes:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
