"""Prometheus metrics of the queue server, read from the service at scrape time.

Labels are queue names (created by operators, so bounded) and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from queue_server.service import QueueService
from telemetry.process import register_process_metrics

FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _ServiceCollector(Collector):
    def __init__(self, service: QueueService) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = time.time()
        gauges = {
            name: GaugeMetricFamily(f"queue_{name}_messages", help_text, labels=["queue"])
            for name, help_text in (
                ("ready", "Messages ready to lease."),
                ("leased", "Messages under a lease."),
                ("delayed", "Messages waiting for their delay to pass."),
            )
        }

        oldest = GaugeMetricFamily(
            "queue_oldest_ready_age_seconds", "Age of the oldest ready message.", labels=["queue"]
        )
        totals = {
            name: CounterMetricFamily(f"queue_{name}", help_text, labels=["queue"])
            for name, help_text in (
                ("published", "Messages published (not counting duplicates)."),
                ("acked", "Messages acknowledged."),
                ("redelivered", "Deliveries after the first."),
                ("dead_lettered", "Messages moved to the dead-letter queue."),
            )
        }

        for name, queue in self.service.broker.queues.items():
            gauges["ready"].add_metric([name], queue.ready)
            gauges["leased"].add_metric([name], queue.leased)
            gauges["delayed"].add_metric([name], queue.delayed)
            published_at = queue.oldest_ready_published_at()
            oldest.add_metric([name], 0.0 if published_at is None else max(0.0, now - published_at))
            totals["published"].add_metric([name], queue.totals.published)
            totals["acked"].add_metric([name], queue.totals.acked)
            totals["redelivered"].add_metric([name], queue.totals.redelivered)
            totals["dead_lettered"].add_metric([name], queue.totals.dead_lettered)
        yield from gauges.values()
        yield oldest
        yield from totals.values()

        wal = GaugeMetricFamily("queue_wal_bytes", "Bytes in write-ahead log segment files.")
        wal.add_metric([], self.service.wal.written_bytes)
        yield wal

        polls = GaugeMetricFamily("queue_waiting_long_polls", "Lease requests waiting for messages.")
        polls.add_metric([], self.service.long_polls)
        yield polls


def build_registry(service: QueueService) -> CollectorRegistry:
    """Create a registry for one service and hook the fsync histogram into its log."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ServiceCollector(service))
    register_process_metrics(registry)
    fsync = Histogram(
        "queue_wal_fsync_seconds",
        "Duration of write-ahead log fdatasync calls.",
        buckets=FSYNC_BUCKETS,
        registry=registry,
    )
    service.sync_observer = fsync.observe
    return registry
