"""Push subscriptions joined to the queue service: API operations, log records, the dispatcher.

Every change to a subscription is appended to the write-ahead log, and the
call returns once the record is durable. A ``SUBSCRIPTION_PUT`` record carries
the whole subscription, secrets included, so the data directory must be
protected like any credential store. A ``SUBSCRIPTION_DELETE`` record carries
the key. ``PushService`` registers itself with the queue service as the
extension ``push``: replay at start rebuilds the registry from the same
records, and each segment's checkpoint carries every subscription.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import orjson

from queue_server.errors import InvalidRequest
from queue_server.push.dispatcher import DEFAULT_WAIT_S, PushDispatcher
from queue_server.push.guard import EndpointGuard, EndpointRejected, ResolutionFailed
from queue_server.push.metrics import PushMetrics
from queue_server.push.registry import SubscriptionRegistry
from queue_server.push.sender import PushMessage, WebhookSender
from queue_server.push.subscription import Subscription
from queue_server.service import Extension, QueueService
from queue_server.wal.records import RecordType, encode_json

logger = logging.getLogger(__name__)


class ServiceSource:
    """Leases, acks and nacks through ``QueueService``, like the HTTP handlers do."""

    def __init__(self, service: QueueService) -> None:
        self.service = service

    async def lease(
        self, queue: str, max_messages: int, wait_s: float, visibility_timeout_s: float
    ) -> list[PushMessage]:
        encoded = await self.service.lease(queue, max_messages, wait_s, visibility_timeout_s)
        return [
            PushMessage(m["id"], m["receipt"], m["deliveries"], m["published_at"], m["body"])
            for m in orjson.loads(encoded)["messages"]
        ]

    async def ack(self, queue: str, receipts: Sequence[str]) -> None:
        await self.service.ack(queue, receipts)

    async def nack(
        self, queue: str, receipts: Sequence[str], *, delay_s: float, dead_letter: bool, reason: str | None
    ) -> None:
        await self.service.nack(queue, receipts, delay_s=delay_s, dead_letter=dead_letter, reason=reason)

    def max_deliveries(self, queue: str) -> int | None:
        config = self.service.queue(queue).config
        return config.max_deliveries if config.dead_letter_queue is not None else None

    def backlog(self, queue: str) -> int:
        state = self.service.queue(queue)
        return state.ready + state.delayed


class PushService:
    """The subscription API of one queue service and the dispatcher that delivers for it.

    Create it before ``service.open()``, which replays the subscriptions into
    ``registry``. ``transport`` replaces the network for tests; ``clock`` is the
    signing clock.
    """

    def __init__(
        self,
        service: QueueService,
        *,
        guard: EndpointGuard,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        wait_s: float = DEFAULT_WAIT_S,
    ) -> None:
        self.service = service
        self.registry = SubscriptionRegistry()
        self.guard = guard
        self.metrics = PushMetrics()
        self.dispatcher = PushDispatcher(
            registry=self.registry,
            source=ServiceSource(service),
            sender=WebhookSender(guard=guard, transport=transport, clock=clock),
            disable=self.disable,
            wait_s=wait_s,
            observer=self.metrics.observe,
        )
        self.metrics.bind(self.dispatcher)
        service.register_extension(
            "push",
            Extension(
                handlers={
                    RecordType.SUBSCRIPTION_PUT: self._replay_put,
                    RecordType.SUBSCRIPTION_DELETE: self._replay_delete,
                },
                checkpoint=self.registry.checkpoint,
                restore=self.registry.restore,
                queue_deleted=self._queue_deleted,
            ),
        )

    def start(self) -> None:
        """Start delivering for the stored subscriptions; call on the running loop."""
        self.dispatcher.start()
        active = sum(1 for s in self.registry.all() if s.state.value == "active")
        if self.registry.all():
            logger.info("push dispatcher started with %d active subscriptions", active)

    async def close(self) -> None:
        await self.dispatcher.close()

    # API operations

    async def put(self, queue: str, name: str, fields: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create or update a subscription; return its description (with a new secret once) and whether it is new."""
        self.service.queue(queue)
        now = time.time()
        planned = self.registry.plan_put(queue, name, fields, now)
        await self._check_endpoint(planned.subscription.config.endpoint)

        await self._store(planned.subscription)
        verb = "created" if planned.created else "updated"
        logger.info(
            "subscription %r of queue %r %s: endpoint %s",
            name,
            queue,
            verb,
            planned.subscription.config.endpoint,
        )
        description = self.describe(planned.subscription, now)
        if planned.new_secret is not None:
            description["secret"] = planned.new_secret
        return description, planned.created

    async def rotate_secret(self, queue: str, name: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Give a subscription a new secret; the old one keeps signing during the overlap."""
        self.service.queue(queue)
        now = time.time()
        subscription, secret = self.registry.plan_rotation(queue, name, fields, now)
        await self._store(subscription)
        logger.info("subscription %r of queue %r has a new signing secret", name, queue)
        return {**self.describe(subscription, now), "secret": secret}

    async def delete(self, queue: str, name: str) -> None:
        self.service.queue(queue)
        self.registry.get(queue, name)
        self.registry.apply_delete(queue, name)
        await self.service.append_durable(
            encode_json(RecordType.SUBSCRIPTION_DELETE, {"queue": queue, "name": name})
        )
        self.dispatcher.reconcile()
        self.metrics.forget(queue, name)
        logger.info("subscription %r of queue %r deleted", name, queue)

    async def disable(self, subscription: Subscription, reason: str) -> None:
        """Store a subscription as disabled (its endpoint responded with 410), unless it changed meanwhile."""
        current = self.registry.find(subscription.queue, subscription.name)
        if current is None or current.state.value != "active":
            return
        await self._store(current.disabled(reason))

    def describe(self, subscription: Subscription, now: float) -> dict[str, Any]:
        return {
            **subscription.to_public(now),
            "stats": self.dispatcher.stats(subscription.queue, subscription.name),
        }

    def list(self, queue: str) -> list[dict[str, Any]]:
        self.service.queue(queue)
        now = time.time()
        return [self.describe(s, now) for s in self.registry.of_queue(queue)]

    def get(self, queue: str, name: str) -> dict[str, Any]:
        self.service.queue(queue)
        return self.describe(self.registry.get(queue, name), time.time())

    # Log replay and queue deletion

    def _replay_put(self, record: dict[str, Any]) -> None:
        self.registry.apply_put(Subscription.from_record(record))

    def _replay_delete(self, record: dict[str, Any]) -> None:
        self.registry.apply_delete(record["queue"], record["name"])

    def _queue_deleted(self, queue: str) -> list[bytes]:
        """Forget the subscriptions of a deleted queue; return the records that log it."""
        dropped = self.registry.drop_queue(queue)
        for subscription in dropped:
            self.metrics.forget(queue, subscription.name)
            logger.info("subscription %r deleted with its queue %r", subscription.name, queue)
        self.dispatcher.reconcile()
        return [
            encode_json(RecordType.SUBSCRIPTION_DELETE, {"queue": queue, "name": subscription.name})
            for subscription in dropped
        ]

    # Helpers

    async def _check_endpoint(self, endpoint: str) -> None:
        try:
            await self.guard.pin(endpoint)
        except (EndpointRejected, ResolutionFailed) as exc:
            raise InvalidRequest(f"endpoint={endpoint!r} is rejected: {exc}") from exc

    async def _store(self, subscription: Subscription) -> None:
        self.registry.apply_put(subscription)
        await self.service.append_durable(encode_json(RecordType.SUBSCRIPTION_PUT, subscription.to_record()))
        self.dispatcher.reconcile()
