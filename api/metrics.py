"""Prometheus metrics of HTTP requests, labelled by route template and status.

Labels use the route template (``/api/v1/gpus/<id>``), never the requested
path, so their number stays bounded. A request that matched no route is
labelled ``unmatched``. Each application has its own registry, so several test
applications in one process do not collide.

With several worker processes, ``telemetry-api`` sets ``PROMETHEUS_MULTIPROC_DIR``
before the workers start. prometheus-client then keeps every worker's values in
files in that folder, and ``render`` adds them up, so one scrape counts the
requests of all workers.
"""

from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["RequestMetrics"]

_KNOWN_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestMetrics:
    """Request counter and latency histogram, recorded by Flask request hooks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "api_http_requests",
            "HTTP requests served, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "api_http_request_duration_seconds",
            "Time from the start of a request's handling to its response, by method and route template.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )

    def install(self, app: Flask) -> None:
        """Record every request of ``app``."""
        app.before_request(self._start)
        app.after_request(self._record)

    def render(self) -> Response:
        """Return the metrics in the Prometheus text format, summed over worker processes when there are several."""
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    @staticmethod
    def _start() -> None:
        g.request_started = time.perf_counter()

    def _record(self, response: Response) -> Response:
        started = g.get("request_started")
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in _KNOWN_METHODS else "other"
        self.requests.labels(method, route, str(response.status_code)).inc()
        if started is not None:
            self.latency.labels(method, route).observe(time.perf_counter() - started)
        return response
