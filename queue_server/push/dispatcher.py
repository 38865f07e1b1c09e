"""The push dispatcher: one worker per active subscription, leasing and delivering batches.

A worker leases up to ``batch_size`` messages with the queue's own lease rules
(so pull consumers and push subscriptions compete for messages) and POSTs them
while fewer than the concurrency limit are in flight. Then, per attempt:

- 2xx: the batch is acked.
- 410: the subscription is disabled and the batch is nacked, ready at once for
  any other consumer.
- anything else (429, 5xx, other 4xx, timeouts, connection errors, a rejected
  address): the concurrency limit is halved, the worker pauses for a backoff
  with full jitter (at least Retry-After), and the batch is nacked with that
  delay. Messages that had their last allowed delivery (the queue's
  max_deliveries) are dead-lettered instead.

Leases are taken for the request timeout plus ``LEASE_MARGIN_S``, so an ack
normally arrives before a lease can expire.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from queue_server.errors import QueueNotFound, QueueServerError
from queue_server.push.backoff import ConcurrencyLimit, Outcome, backoff_delay
from queue_server.push.registry import SubscriptionRegistry
from queue_server.push.sender import AttemptResult, PushMessage, WebhookSender
from queue_server.push.subscription import Subscription, SubscriptionState

logger = logging.getLogger(__name__)

LEASE_MARGIN_S = 30.0
#: Long-poll wait of a worker's lease request, in seconds.
DEFAULT_WAIT_S = 5.0
#: Pause after the queue itself failed a lease, ack or nack (for example while it shuts down).
QUEUE_ERROR_PAUSE_S = 1.0


class MessageSource(Protocol):
    """The queue operations a worker needs; ``ServiceSource`` adapts ``QueueService``."""

    async def lease(
        self, queue: str, max_messages: int, wait_s: float, visibility_timeout_s: float
    ) -> list[PushMessage]: ...

    async def ack(self, queue: str, receipts: Sequence[str]) -> None: ...

    async def nack(
        self, queue: str, receipts: Sequence[str], *, delay_s: float, dead_letter: bool, reason: str | None
    ) -> None: ...

    def max_deliveries(self, queue: str) -> int | None:
        """Return the delivery count after which messages are dead-lettered, or ``None`` for never."""
        ...

    def backlog(self, queue: str) -> int:
        """Return the messages of ``queue`` waiting for a consumer (ready and delayed)."""
        ...


#: Called with a subscription and a reason when its endpoint responds with 410.
DisableHook = Callable[[Subscription, str], Awaitable[None]]


@dataclass(slots=True)
class DeliveryStats:
    """Counters and state of one subscription's worker since this process started."""

    attempts: Counter[str] = field(default_factory=Counter)
    messages_delivered: int = 0
    messages_dead_lettered: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_success_at: float | None = None
    last_failure_at: float | None = None


class SubscriptionWorker:
    """Leases and delivers for one subscription until it is deleted, disabled or the dispatcher closes."""

    def __init__(self, dispatcher: "PushDispatcher", key: tuple[str, str], maximum: int) -> None:
        self.dispatcher = dispatcher
        self.key = key
        self.limit = ConcurrencyLimit(maximum)
        self.stats = DeliveryStats()
        self.in_flight = 0
        self.paused_until = 0.0
        self.deliveries: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        queue, name = self.key
        source = self.dispatcher.source
        while self.dispatcher.running:
            subscription = self.dispatcher.registry.find(queue, name)
            if subscription is None or subscription.state is not SubscriptionState.ACTIVE:
                return
            self.limit.resize(subscription.config.max_concurrency)
            if self.in_flight >= self.limit.current:
                await self._wait_for_change(None)
                continue
            pause = self.paused_until - time.monotonic()
            if pause > 0:
                await self._wait_for_change(pause)
                continue

            config = subscription.config
            try:
                messages = await source.lease(
                    queue, config.batch_size, self.dispatcher.wait_s, config.timeout_s + LEASE_MARGIN_S
                )
            except QueueNotFound:
                return
            except QueueServerError as exc:
                logger.debug("subscription %s/%s: lease failed: %s", queue, name, exc)
                await self._wait_for_change(QUEUE_ERROR_PAUSE_S)
                continue
            if not messages:
                continue

            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._deliver(subscription, messages))
            self.deliveries.add(task)
            task.add_done_callback(self.deliveries.discard)

    async def _wait_for_change(self, timeout: float | None) -> None:
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def _deliver(self, subscription: Subscription, messages: list[PushMessage]) -> None:
        started = time.perf_counter()
        try:
            result = await self.dispatcher.sender.send(subscription, messages)
            self.dispatcher.observe(subscription, result, time.perf_counter() - started)
            self.stats.attempts[result.outcome.value] += 1
            if result.outcome is Outcome.DELIVERED:
                await self._delivered(subscription, messages)
            elif result.outcome is Outcome.GONE:
                await self._gone(subscription, messages)
            else:
                await self._failed(subscription, messages, result)
        except QueueServerError as exc:
            # The leases expire and the messages are delivered again.
            logger.warning(
                "subscription %s/%s: settling %d messages failed: %s",
                subscription.queue,
                subscription.name,
                len(messages),
                exc,
            )
        except Exception:
            logger.exception(
                "subscription %s/%s: delivering %d messages failed unexpectedly; their leases expire",
                subscription.queue,
                subscription.name,
                len(messages),
            )
        finally:
            self.in_flight -= 1
            self.wake()

    async def _delivered(self, subscription: Subscription, messages: list[PushMessage]) -> None:
        await self.dispatcher.source.ack(subscription.queue, [m.receipt for m in messages])
        stats = self.stats
        if stats.consecutive_failures:
            logger.info(
                "subscription %s/%s: endpoint accepted a batch again after %d failed attempts",
                subscription.queue,
                subscription.name,
                stats.consecutive_failures,
            )
        stats.consecutive_failures = 0
        stats.messages_delivered += len(messages)
        stats.last_success_at = time.time()
        self.limit.on_success()

    async def _gone(self, subscription: Subscription, messages: list[PushMessage]) -> None:
        reason = f"endpoint answered 410 Gone at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        logger.warning(
            "subscription %s/%s disabled: %s; PUT the subscription again to enable it",
            subscription.queue,
            subscription.name,
            reason,
        )
        await self.dispatcher.disable(subscription, reason)
        await self.dispatcher.source.nack(
            subscription.queue, [m.receipt for m in messages], delay_s=0, dead_letter=False, reason=None
        )

    async def _failed(self, subscription: Subscription, messages: list[PushMessage], result: AttemptResult) -> None:
        stats = self.stats
        stats.consecutive_failures += 1
        stats.last_error = f"{result.outcome.value}: {result.detail}"
        stats.last_failure_at = time.time()
        self.limit.on_failure()
        delay = backoff_delay(
            subscription.config.retry,
            stats.consecutive_failures,
            result.retry_after_s,
            uniform=self.dispatcher.uniform,
        )
        self.paused_until = max(self.paused_until, time.monotonic() + delay)
        level = logging.WARNING if stats.consecutive_failures == 1 else logging.DEBUG
        logger.log(
            level,
            "subscription %s/%s: delivery of %d messages failed (%s), attempt streak %d, retry in %.1f s",
            subscription.queue,
            subscription.name,
            len(messages),
            stats.last_error,
            stats.consecutive_failures,
            delay,
        )

        source = self.dispatcher.source
        limit = source.max_deliveries(subscription.queue)
        exhausted = [m.receipt for m in messages if limit is not None and m.deliveries >= limit]
        retried = [m.receipt for m in messages if limit is None or m.deliveries < limit]
        if exhausted:
            reason = f"push subscription {subscription.name!r} failed: {stats.last_error}"[:1000]
            await source.nack(subscription.queue, exhausted, delay_s=0, dead_letter=True, reason=reason)
            stats.messages_dead_lettered += len(exhausted)
        if retried:
            await source.nack(subscription.queue, retried, delay_s=delay, dead_letter=False, reason=None)


class PushDispatcher:
    """Runs one ``SubscriptionWorker`` per active subscription of ``registry``.

    Call ``reconcile`` after every change to the registry. ``disable`` is the
    hook that stores a subscription's disabled state (it logs the change).
    """

    def __init__(
        self,
        *,
        registry: SubscriptionRegistry,
        source: MessageSource,
        sender: WebhookSender,
        disable: DisableHook,
        wait_s: float = DEFAULT_WAIT_S,
        uniform: Callable[[float, float], float] = random.uniform,
        observer: Callable[[Subscription, AttemptResult, float], None] | None = None,
    ) -> None:
        self.registry = registry
        self.source = source
        self.sender = sender
        self.disable = disable
        self.wait_s = wait_s
        self.uniform = uniform
        self.workers: dict[tuple[str, str], SubscriptionWorker] = {}
        self._observer = observer
        self.running = False

    def observe(self, subscription: Subscription, result: AttemptResult, seconds: float) -> None:
        if self._observer is not None:
            self._observer(subscription, result, seconds)

    def start(self) -> None:
        self.running = True
        self.reconcile()

    def reconcile(self) -> None:
        """Start workers for new or re-enabled subscriptions and wake the others to see changes."""
        if not self.running:
            return
        for subscription in self.registry.all():
            if subscription.state is not SubscriptionState.ACTIVE:
                continue
            worker = self.workers.get(subscription.key)
            if worker is None:
                worker = SubscriptionWorker(self, subscription.key, subscription.config.max_concurrency)
                self.workers[subscription.key] = worker
            if worker.task is None or worker.task.done():
                worker.task = asyncio.get_running_loop().create_task(
                    self._run_worker(worker), name=f"push-{subscription.queue}-{subscription.name}"
                )
                logger.info(
                    "pushing queue %r to subscription %r at %s",
                    subscription.queue,
                    subscription.name,
                    subscription.config.endpoint,
                )
        for key, worker in list(self.workers.items()):
            if self.registry.find(*key) is None and not worker.deliveries:
                # Deleted: stop waiting in a long-poll for it.
                if worker.task is not None:
                    worker.task.cancel()
                del self.workers[key]
            else:
                worker.wake()

    async def _run_worker(self, worker: SubscriptionWorker) -> None:
        try:
            await worker.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("push worker of subscription %s/%s failed", *worker.key)

    def stats(self, queue: str, name: str) -> dict[str, Any]:
        """Return the delivery stats of one subscription, as the API shows them."""
        worker = self.workers.get((queue, name))
        stats = worker.stats if worker is not None else DeliveryStats()
        try:
            backlog = self.source.backlog(queue)
        except QueueServerError:
            backlog = 0
        return {
            "attempts": dict(stats.attempts),
            "messages_delivered": stats.messages_delivered,
            "messages_dead_lettered": stats.messages_dead_lettered,
            "consecutive_failures": stats.consecutive_failures,
            "last_error": stats.last_error,
            "last_success_at": stats.last_success_at,
            "last_failure_at": stats.last_failure_at,
            "concurrency": worker.limit.current if worker is not None else 0,
            "in_flight": worker.in_flight if worker is not None else 0,
            "backlog": backlog,
        }

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop leasing, give deliveries in flight ``grace_s`` seconds to finish, then cancel them."""
        self.running = False
        tasks = [w.task for w in self.workers.values() if w.task is not None]
        for worker in self.workers.values():
            worker.wake()
        # Workers also stop on ``running``: a cancellation that races with a
        # long-poll's wake-up can be absorbed by ``asyncio.wait_for`` on Python 3.11.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        deliveries = [task for w in self.workers.values() for task in w.deliveries]
        if deliveries:
            _, pending = await asyncio.wait(deliveries, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.sender.aclose()
