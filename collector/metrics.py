"""Prometheus metrics of one collector process.

Each ``CollectorMetrics`` has its own registry, so several collectors can run in
one process (tests do) without clashing on metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from telemetry.process import register_process_metrics

#: Reasons a message is rejected: those of ``telemetry.record.InvalidRecord``, and
#: a record that the database refuses as a data error.
REJECTION_REASONS = ("invalid_json", "not_an_object", "missing_field", "invalid_field", "rejected_by_database")

__all__ = ["CollectorMetrics"]

#: Bucket bounds of the commit latency histogram, in seconds.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class CollectorMetrics:
    """The collector's counters, gauges and histograms, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            register_process_metrics(registry)
        self.registry = registry
        self.messages_leased = Counter(
            "telemetry_collector_messages_leased_total",
            "Messages received in leases, redeliveries included.",
            registry=self.registry,
        )
        self.messages_stored = Counter(
            "telemetry_collector_messages_stored_total",
            "Samples inserted into the database.",
            registry=self.registry,
        )
        self.duplicates_ignored = Counter(
            "telemetry_collector_duplicates_ignored_total",
            "Samples skipped because their idempotency key was already stored.",
            registry=self.registry,
        )
        self.messages_rejected = Counter(
            "telemetry_collector_messages_rejected_total",
            "Messages sent to the dead-letter queue, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.messages_acked = Counter(
            "telemetry_collector_messages_acked_total",
            "Deliveries acknowledged after their batch was committed.",
            registry=self.registry,
        )
        self.receipts_lost = Counter(
            "telemetry_collector_receipts_lost_total",
            "Acks, nacks or extends the queue rejected as stale or not found "
            "(the lease had expired; a redelivery is stored as a duplicate).",
            ["verb"],
            registry=self.registry,
        )
        self.batch_commit_seconds = Histogram(
            "telemetry_collector_batch_commit_seconds",
            "Time to write and commit one batch to the database.",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "telemetry_collector_batch_messages",
            "Messages per leased batch.",
            buckets=(1, 10, 50, 100, 250, 500, 750, 1000),
            registry=self.registry,
        )
        self.database_errors = Counter(
            "telemetry_collector_database_errors_total",
            "Failed attempts to store a batch (the batch is retried).",
            registry=self.registry,
        )
        self.queue_errors = Counter(
            "telemetry_collector_queue_errors_total",
            "Queue requests that failed after the client's own retries, by verb.",
            ["verb"],
            registry=self.registry,
        )
        self.lag_seconds = Gauge(
            "telemetry_collector_lag_seconds",
            "Age of the oldest message of the last committed batch at commit time; "
            "0 after an empty lease.",
            registry=self.registry,
        )
        self.messages_in_hand = Gauge(
            "telemetry_collector_messages_in_hand",
            "Leased messages not yet acknowledged or returned to the queue.",
            registry=self.registry,
        )
        # Known label values start at zero, so that a query of a healthy collector
        # returns a series before the first rejection, lost receipt or queue error.
        for reason in REJECTION_REASONS:
            self.messages_rejected.labels(reason)
        for verb in ("ack", "nack", "extend"):
            self.receipts_lost.labels(verb)
        for verb in ("create", "lease", "ack", "nack", "extend"):
            self.queue_errors.labels(verb)
