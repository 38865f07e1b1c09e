"""Prometheus metrics of push subscriptions.

Labels are the queue and subscription names (both created by operators, so
bounded) and the attempt outcome (a fixed set).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from queue_server.push.sender import AttemptResult
from queue_server.push.subscription import Subscription

if TYPE_CHECKING:
    from queue_server.push.dispatcher import PushDispatcher

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LABELS = ["queue", "subscription"]


class _DispatcherCollector(Collector):
    def __init__(self, metrics: "PushMetrics") -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        attempts = CounterMetricFamily(
            "queue_push_deliveries",
            "Delivery attempts (POSTs of one batch) by outcome.",
            labels=[*LABELS, "outcome"],
        )
        delivered = CounterMetricFamily(
            "queue_push_messages_delivered", "Messages acknowledged by a 2xx from the endpoint.", labels=LABELS
        )
        dead_lettered = CounterMetricFamily(
            "queue_push_messages_dead_lettered",
            "Messages dead-lettered after their last allowed delivery failed.",
            labels=LABELS,
        )
        concurrency = GaugeMetricFamily(
            "queue_push_concurrency", "Current limit on deliveries in flight (AIMD).", labels=LABELS
        )
        in_flight = GaugeMetricFamily("queue_push_in_flight", "Deliveries waiting for an answer.", labels=LABELS)
        backlog = GaugeMetricFamily(
            "queue_push_backlog_messages",
            "Ready and delayed messages of the subscription's queue.",
            labels=LABELS,
        )
        dispatcher = self.metrics.dispatcher
        if dispatcher is not None:
            for subscription in dispatcher.registry.all():
                labels = [subscription.queue, subscription.name]
                stats = dispatcher.stats(subscription.queue, subscription.name)
                for outcome, count in stats["attempts"].items():
                    attempts.add_metric([*labels, outcome], count)
                delivered.add_metric(labels, stats["messages_delivered"])
                dead_lettered.add_metric(labels, stats["messages_dead_lettered"])
                concurrency.add_metric(labels, stats["concurrency"])
                in_flight.add_metric(labels, stats["in_flight"])
                backlog.add_metric(labels, stats["backlog"])
        yield from (attempts, delivered, dead_lettered, concurrency, in_flight, backlog)


class PushMetrics:
    """Delivery latency as a histogram, and the rest read from the dispatcher at scrape time."""

    def __init__(self) -> None:
        self.dispatcher: PushDispatcher | None = None
        self._registry: CollectorRegistry | None = None
        self._latency: Histogram | None = None

    def bind(self, dispatcher: "PushDispatcher") -> None:
        self.dispatcher = dispatcher

    def register(self, registry: CollectorRegistry) -> None:
        """Add the push metrics to ``registry`` (the queue server's)."""
        self._registry = registry
        self._latency = Histogram(
            "queue_push_delivery_seconds",
            "Time from sending a batch to the endpoint's answer (or the failure).",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        registry.register(_DispatcherCollector(self))

    def observe(self, subscription: Subscription, result: AttemptResult, seconds: float) -> None:
        if self._latency is not None:
            self._latency.labels(subscription.queue, subscription.name).observe(seconds)

    def forget(self, queue: str, name: str) -> None:
        """Drop the latency series of a deleted subscription."""
        if self._latency is not None:
            try:
                self._latency.remove(queue, name)
            except KeyError:
                pass
