"""Prometheus metrics of one streamer, and the rate-limited report of rejected rows."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streamer.dcgm_csv import REJECT_REASONS, RejectedRow
from telemetry.process import register_process_metrics

__all__ = ["StreamerMetrics", "RejectReporter"]

logger = logging.getLogger(__name__)

_PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class StreamerMetrics:
    """The streamer's metrics, in a registry of their own so several streamers can share a process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            register_process_metrics(registry)
        self.registry = registry
        self.rows_read = Counter(
            "streamer_rows_read", "CSV records read, valid or not.", registry=self.registry
        )
        self.rows_published = Counter(
            "streamer_rows_published",
            "Rows published to the telemetry queue, duplicates included.",
            registry=self.registry,
        )
        self.rows_duplicate = Counter(
            "streamer_rows_duplicate",
            "Published rows the queue had already stored under the same idempotency key.",
            registry=self.registry,
        )
        self.rows_rejected = Counter(
            "streamer_rows_rejected", "CSV records skipped, by reason.", ["reason"], registry=self.registry
        )
        for reason in REJECT_REASONS:
            self.rows_rejected.labels(reason=reason)
        self.publish_seconds = Histogram(
            "streamer_publish_seconds",
            "Time to publish one batch, retries included.",
            buckets=_PUBLISH_BUCKETS,
            registry=self.registry,
        )
        self.shards_held = Gauge(
            "streamer_shards_held", "Shard messages this streamer holds a lease on.", registry=self.registry
        )
        self.shards_completed = Counter(
            "streamer_shards_completed", "Shards published in full for one pass.", registry=self.registry
        )
        self.schedule_lag = Gauge(
            "streamer_schedule_lag_seconds",
            "How far behind its scheduled start the last shard began (0 when on time).",
            registry=self.registry,
        )


@dataclass
class RejectReporter:
    """Count rejected rows and log at most one line per reason per ``interval_s``.

    The line names the first rejected row of the interval and how many more rows
    were rejected for the same reason since the previous line.
    """

    metrics: StreamerMetrics
    source: str
    interval_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _last_logged: dict[str, float] = field(default_factory=dict)
    _unlogged: dict[str, int] = field(default_factory=dict)

    def report(self, row: RejectedRow) -> None:
        self.metrics.rows_rejected.labels(reason=row.reason).inc()
        now = self.clock()
        last = self._last_logged.get(row.reason)
        if last is not None and now - last < self.interval_s:
            self._unlogged[row.reason] = self._unlogged.get(row.reason, 0) + 1
            return

        skipped = self._unlogged.pop(row.reason, 0)
        self._last_logged[row.reason] = now
        logger.warning(
            "skipped %s line %d (%s): %s%s",
            self.source,
            row.line,
            row.reason,
            row.message,
            f"; {skipped} more rows skipped for this reason since the last report" if skipped else "",
        )
