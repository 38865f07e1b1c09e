"""The pull loop: lease batches from the queue, store them, acknowledge them.

Lease tasks and a store task run side by side. Each lease task long-polls for
up to ``batch_size`` messages, validates them and hands the batch to the store
task through a bounded buffer, so the next batches are already leased and
validated while the current ones are written. The store task merges the batches
that are ready (up to ``max_transaction_rows`` records, waiting at most
``max_merge_wait_s`` for more), writes them in one transaction (in a worker
thread) and acknowledges their messages only after the commit. A ``KnownGpus``
cache spares each transaction the GPU and (GPU, metric) rows it already stored.

Failure handling:

- An invalid message is nacked to the dead-letter queue with its reason; the
  rest of its batch is stored. A record the database rejects (a data or integrity
  error) is found by splitting the batch and is dead-lettered the same way.
- While the database is unreachable or locked, the store task retries the same
  batch with exponential backoff and the extend task keeps the batch's leases
  alive. Nothing is acknowledged before its commit, so a message is never lost.
- Queue failures are retried by ``QueueClient`` and then, here, with backoff.
- On stop, leasing ends at once; batches in hand are stored and acknowledged,
  or returned to the queue if the database stays down past ``stop_timeout_s``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from collector.metrics import CollectorMetrics
from collector.storage import KnownGpus, StoreResult, store_records
from telemetry.queue_client import LeasedMessage, QueueClient, QueueError, QueueNotFound
from telemetry.record import (
    TELEMETRY_QUEUE,
    AnyRecord,
    DecodedRecord,
    InvalidRecord,
    LabelsCheck,
    TelemetryRecord,
)
from telemetry.settings import InvalidConfig

__all__ = ["Collector", "CollectorConfig"]

logger = logging.getLogger(__name__)

#: Reason label of records that pass validation but that the database rejects.
REJECTED_BY_DATABASE = "rejected_by_database"

#: How long a stopping collector waits for a lease request in flight, in seconds.
STOP_LEASE_GRACE_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectorConfig:
    """Options of the pull loop. Durations are in seconds."""

    queue: str = TELEMETRY_QUEUE
    batch_size: int = 1000
    wait_s: float = 20.0
    visibility_timeout_s: float = 60.0
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    stop_timeout_s: float = 30.0
    rejection_log_interval_s: float = 60.0
    #: Lease requests kept in flight. Two keep the database busy while the queue
    #: server prepares the next batch.
    concurrent_leases: int = 2
    #: Maximum records written in one transaction, merged from leased batches.
    #: A batch is never split, so a transaction contains at least one whole batch.
    #: Each transaction upserts the GPUs it saw and commits, a fixed cost of a few
    #: milliseconds. On 2 vCPUs a collector draining a backlog wrote on average
    #: 14 % (SQLite) and 26 % (PostgreSQL) more rows per second with 10,000 than
    #: with 5000 (``make bench-ingest``).
    max_transaction_rows: int = 10_000
    #: How long the store task waits for more batches to merge into a
    #: transaction that has fewer than ``max_transaction_rows`` records.
    max_merge_wait_s: float = 0.02

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 1000:
            raise InvalidConfig("batch_size", self.batch_size, "1 to 1000")
        if not 0 <= self.wait_s <= 20:
            raise InvalidConfig("wait_s", self.wait_s, "0 to 20 seconds")
        if self.max_transaction_rows < 1:
            raise InvalidConfig("max_transaction_rows", self.max_transaction_rows, "1 or more")
        if not 0 <= self.max_merge_wait_s <= 10:
            raise InvalidConfig("max_merge_wait_s", self.max_merge_wait_s, "0 to 10 seconds")
        if self.concurrent_leases < 1:
            raise InvalidConfig("concurrent_leases", self.concurrent_leases, "1 or more")
        if not 1 <= self.visibility_timeout_s <= 43200:
            raise InvalidConfig("visibility_timeout_s", self.visibility_timeout_s, "1 to 43200 seconds")
        if self.stop_timeout_s < 0:
            raise InvalidConfig("stop_timeout_s", self.stop_timeout_s, "0 or more seconds")


@dataclass(eq=False)
class _Batch:
    """Valid leased messages, each with its record, on their way to the database."""

    items: list[tuple[LeasedMessage, AnyRecord]]
    oldest_published_at: float | None
    extended_at: float = field(default_factory=time.monotonic)

    @property
    def records(self) -> list[AnyRecord]:
        return [record for _, record in self.items]

    @property
    def receipts(self) -> list[str]:
        return [message.receipt for message, _ in self.items]


class _RejectionLog:
    """Log one warning per rejection reason per interval, and count the rest."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def record(self, reason: str, message_id: str, detail: str) -> None:
        now = time.monotonic()
        last = self._last_logged.get(reason)
        if last is not None and now - last < self.interval_s:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return

        suppressed = self._suppressed.pop(reason, 0)
        self._last_logged[reason] = now
        more = f" ({suppressed} more with this reason since the last warning)" if suppressed else ""
        logger.warning(
            "message %s dead-lettered, reason %s: %s%s", message_id, reason, detail, more
        )


class Collector:
    """Moves telemetry from a queue into the database until ``request_stop``.

    ``queue`` and ``engine`` belong to the caller, who closes them after ``run``
    returns.
    """

    def __init__(
        self,
        queue: QueueClient,
        engine: Engine,
        *,
        config: CollectorConfig | None = None,
        metrics: CollectorMetrics | None = None,
    ) -> None:
        self.queue = queue
        self.engine = engine
        self.config = config or CollectorConfig()
        self.metrics = metrics or CollectorMetrics()
        self._stop = asyncio.Event()
        # Holds as many batches as one transaction takes, so batches leased while
        # a transaction is written are merged into the next one.
        self._buffer: asyncio.Queue[_Batch | None] = asyncio.Queue(
            maxsize=max(1, -(-self.config.max_transaction_rows // self.config.batch_size))
        )
        self._carried: collections.deque[_Batch | None] = collections.deque()
        self._known_gpus = KnownGpus()
        self._in_hand: set[_Batch] = set()
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self._rejections = _RejectionLog(self.config.rejection_log_interval_s)
        self._labels_check = LabelsCheck()
        self.database_failing = False

    def request_stop(self) -> None:
        """Stop leasing and finish the batches in hand, after which ``run`` returns."""
        if not self._stop.is_set():
            logger.info("stop requested: finishing %d leased batches", len(self._in_hand))
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Create the queue if missing, then lease, store and ack until stopped."""
        if not await self._create_queue():
            return
        logger.info(
            "collecting from queue %r: batches of up to %d, visibility timeout %.0f s",
            self.config.queue,
            self.config.batch_size,
            self.config.visibility_timeout_s,
        )

        lease_task = asyncio.create_task(self._lease_loop(), name="collector-lease")
        extend_task = asyncio.create_task(self._extend_loop(), name="collector-extend")
        try:
            await self._store_loop()
        finally:
            lease_task.cancel()
            extend_task.cancel()
            await asyncio.gather(lease_task, extend_task, return_exceptions=True)
            if self._ack_tasks:
                await asyncio.gather(*self._ack_tasks, return_exceptions=True)
        logger.info("collector stopped")

    async def check_database(self, timeout_s: float = 2.0) -> bool:
        """Return whether ``SELECT 1`` succeeds within ``timeout_s`` seconds."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self._ping_database), timeout_s)
        except (SQLAlchemyError, TimeoutError) as exc:
            logger.debug("database check failed: %s", exc)
            return False
        return True

    def _ping_database(self) -> None:
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    # Leasing

    async def _create_queue(self) -> bool:
        attempt = 0
        while not self.stopping:
            try:
                await self.queue.create_queue(self.config.queue)
                return True
            except QueueError as exc:
                attempt += 1
                self.metrics.queue_errors.labels("create").inc()
                delay = self._backoff(attempt)
                logger.warning(
                    "creating queue %r failed (%s), retry in %.1f s", self.config.queue, exc, delay
                )
                await self._sleep(delay)
        return False

    async def _lease_loop(self) -> None:
        await asyncio.gather(
            *(self._lease_until_stopped() for _ in range(self.config.concurrent_leases))
        )
        # Tells the store task that no batch follows. A cancelled lease task skips
        # this, because its canceller no longer waits for the store task.
        await self._buffer.put(None)

    async def _lease_until_stopped(self) -> None:
        try:
            await self._lease_batches()
        except Exception:
            logger.exception("leasing failed unexpectedly; stopping the collector")
            self.request_stop()

    async def _lease_batches(self) -> None:
        attempt = 0
        while not self.stopping:
            try:
                messages = await self._lease_unless_stopped()
            except QueueNotFound:
                logger.warning("queue %r not found, creating it again", self.config.queue)
                if not await self._create_queue():
                    break
                continue
            except QueueError as exc:
                attempt += 1
                self.metrics.queue_errors.labels("lease").inc()
                delay = self._backoff(attempt)
                logger.warning("lease failed (%s), retry in %.1f s", exc, delay)
                await self._sleep(delay)
                continue
            if messages is None:
                break
            attempt = 0
            if not messages:
                self.metrics.lag_seconds.set(0)
                continue

            batch = await self._prepare(messages)
            if batch is not None:
                # Waits while one batch is being written and another is buffered.
                await self._buffer.put(batch)

    async def _lease_unless_stopped(self) -> list[LeasedMessage] | None:
        """Long-poll once; return None if a stop request comes first.

        On a stop, a lease request in flight gets ``STOP_LEASE_GRACE_S`` to return,
        because a request that finds ready messages returns at once and those
        messages are then stored before the collector exits. A long-poll still
        waiting after that is cancelled. Messages it may have leased on the server
        in the meantime are not lost: their leases expire and they are delivered again.
        """
        lease = asyncio.ensure_future(
            self.queue.lease(
                self.config.queue,
                max_messages=self.config.batch_size,
                wait_s=self.config.wait_s,
                visibility_timeout_s=self.config.visibility_timeout_s,
                body_type=DecodedRecord,
            )
        )
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({lease, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not lease.done():
            await asyncio.wait({lease}, timeout=STOP_LEASE_GRACE_S)
        if lease.done():
            return lease.result()
        lease.cancel()
        await asyncio.gather(lease, return_exceptions=True)
        return None

    async def _prepare(self, messages: Sequence[LeasedMessage]) -> _Batch | None:
        """Validate leased messages, dead-letter the invalid ones and return a batch of the rest."""
        self.metrics.messages_leased.inc(len(messages))
        self.metrics.batch_size.observe(len(messages))

        items: list[tuple[LeasedMessage, AnyRecord]] = []
        unchecked: list[LeasedMessage] = []
        for message in messages:
            body = message.body
            if isinstance(body, DecodedRecord):
                if body.in_utc and self._labels_check(body.labels):
                    items.append((message, body))
                    continue
                # pydantic converts a time at another offset to UTC or rejects it,
                # and rejects invalid labels with the reason.
                message = msgspec.structs.replace(message, body=body.to_plain())
            unchecked.append(message)

        # Bodies the lease could not decode as records are valid only after a type
        # conversion, or invalid. pydantic decides which, with the reason.
        rejected: dict[str, list[LeasedMessage]] = {}
        parsed = TelemetryRecord.parse_bodies([message.body for message in unchecked])
        for message, outcome in zip(unchecked, parsed, strict=True):
            if isinstance(outcome, InvalidRecord):
                rejected.setdefault(outcome.reason, []).append(message)
                self._rejections.record(outcome.reason, message.id, str(outcome))
            else:
                items.append((message, outcome))

        for reason, invalid in rejected.items():
            await self._dead_letter(reason, invalid)
        if not items:
            return None

        batch = _Batch(items=items, oldest_published_at=_oldest_published_at(messages))
        self._in_hand.add(batch)
        self.metrics.messages_in_hand.inc(len(items))
        return batch

    async def _dead_letter(self, reason: str, messages: Sequence[LeasedMessage]) -> None:
        try:
            results = await self.queue.nack(
                self.config.queue,
                [message.receipt for message in messages],
                dead_letter=True,
                reason=reason,
            )
        except QueueError as exc:
            # The leases expire, the messages come back, and they are rejected again.
            self.metrics.queue_errors.labels("nack").inc()
            logger.warning(
                "dead-lettering %d messages (reason %s) failed: %s", len(messages), reason, exc
            )
            return
        self.metrics.messages_rejected.labels(reason).inc(
            sum(1 for result in results if result.ok)
        )
        self._count_lost_receipts("nack", results)

    # Storing

    async def _store_loop(self) -> None:
        while True:
            batches = await self._next_transaction()
            if batches is None:
                return
            stored = await self._store_until_committed(batches)
            if stored:
                # One request acknowledges the whole transaction, because each
                # request costs the collector and the queue server more than its receipts.
                task = asyncio.create_task(self._ack(batches))
                self._ack_tasks.add(task)
                task.add_done_callback(self._ack_tasks.discard)
            else:
                for batch in batches:
                    await self._release(batch)

    async def _next_transaction(self) -> list[_Batch] | None:
        """Take the batches of the next transaction; None once leasing has ended.

        Batches already buffered are merged up to ``max_transaction_rows``
        records, and the task waits up to ``max_merge_wait_s`` for more. A batch
        that does not fit, or the end marker, is carried over to the next call.
        """
        first = self._carried.popleft() if self._carried else await self._buffer.get()
        if first is None:
            return None

        batches = [first]
        rows = len(first.items)
        deadline = time.monotonic() + self.config.max_merge_wait_s
        while rows < self.config.max_transaction_rows:
            try:
                batch = self._buffer.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.stopping:
                    break
                try:
                    batch = await asyncio.wait_for(self._buffer.get(), remaining)
                except TimeoutError:
                    break
            if batch is None or rows + len(batch.items) > self.config.max_transaction_rows:
                self._carried.append(batch)
                break
            batches.append(batch)
            rows += len(batch.items)
        return batches

    async def _store_until_committed(self, batches: list[_Batch]) -> bool:
        """Write the batches in one transaction, retrying database failures.

        Returns False when a stop ends the retries.
        """
        records = [record for batch in batches for record in batch.records]
        attempt = 0
        deadline: float | None = None
        while True:
            started = time.perf_counter()
            try:
                result, refused = await asyncio.to_thread(self._store_isolating, records)
            except SQLAlchemyError as exc:
                attempt += 1
                self.metrics.database_errors.inc()
                self.database_failing = True
                delay = self._backoff(attempt)
                # The first failure and every tenth after it are warnings, so a
                # long outage stays visible without a line per retry.
                level = logging.WARNING if attempt % 10 == 1 else logging.DEBUG
                logger.log(
                    level,
                    "storing %d records failed (attempt %d, %s), leases kept, retry in %.1f s",
                    len(records),
                    attempt,
                    _short_error(exc),
                    delay,
                )
                if self.stopping:
                    deadline = deadline or time.monotonic() + self.config.stop_timeout_s
                    if time.monotonic() + delay > deadline:
                        logger.warning(
                            "database still failing at stop: returning %d messages to the queue",
                            len(records),
                        )
                        return False
                await asyncio.sleep(delay)
                continue

            if self.database_failing:
                logger.info("database writable again after %d failed attempts", attempt)
            self.database_failing = False
            self.metrics.batch_commit_seconds.observe(time.perf_counter() - started)
            self.metrics.messages_stored.inc(result.stored)
            self.metrics.duplicates_ignored.inc(result.duplicates)
            published = [b.oldest_published_at for b in batches if b.oldest_published_at is not None]
            if published:
                self.metrics.lag_seconds.set(max(0.0, time.time() - min(published)))
            logger.debug(
                "transaction of %d batches committed: %d stored, %d duplicates",
                len(batches),
                result.stored,
                result.duplicates,
            )
            if refused:
                for batch in batches:
                    await self._dead_letter_refused(batch, refused)
            return True

    def _store_isolating(
        self, records: Sequence[AnyRecord]
    ) -> tuple[StoreResult, list[tuple[AnyRecord, str]]]:
        """Store records; when the database rejects the data, split to find the culprits.

        Returns the combined result and the records the database rejected, each with
        the error. Connection and lock failures propagate so the caller retries.
        """
        try:
            return store_records(self.engine, records, known=self._known_gpus), []
        except (DataError, IntegrityError) as exc:
            if len(records) == 1:
                return StoreResult(stored=0, duplicates=0), [(records[0], _short_error(exc))]
        middle = len(records) // 2
        first, first_refused = self._store_isolating(records[:middle])
        second, second_refused = self._store_isolating(records[middle:])
        combined = StoreResult(
            stored=first.stored + second.stored, duplicates=first.duplicates + second.duplicates
        )
        return combined, first_refused + second_refused

    async def _dead_letter_refused(
        self, batch: _Batch, refused: Sequence[tuple[AnyRecord, str]]
    ) -> None:
        errors = {id(record): error for record, error in refused}
        if not any(id(record) in errors for _, record in batch.items):
            return
        kept: list[tuple[LeasedMessage, AnyRecord]] = []
        messages: list[LeasedMessage] = []
        for message, record in batch.items:
            error = errors.get(id(record))
            if error is None:
                kept.append((message, record))
                continue
            messages.append(message)
            self._rejections.record(REJECTED_BY_DATABASE, message.id, error)

        batch.items = kept
        self.metrics.messages_in_hand.dec(len(messages))
        await self._dead_letter(REJECTED_BY_DATABASE, messages)

    # Acknowledging

    async def _ack(self, batches: list[_Batch]) -> None:
        # A batch whose messages were all dead-lettered instead has no receipts left.
        receipts = [receipt for batch in batches for receipt in batch.receipts]
        try:
            if receipts:
                results = await self.queue.ack(self.config.queue, receipts)
                self.metrics.messages_acked.inc(sum(1 for result in results if result.ok))
                self._count_lost_receipts("ack", results)
        except QueueError as exc:
            # The batches are committed; a redelivery is ignored as a duplicate.
            self.metrics.queue_errors.labels("ack").inc()
            logger.warning(
                "ack of %d stored messages failed (%s); they will be delivered again "
                "and ignored as duplicates",
                len(receipts),
                exc,
            )
        finally:
            for batch in batches:
                self._forget(batch)

    async def _release(self, batch: _Batch) -> None:
        """Return an unstored batch to the queue, to be leased again at once."""
        try:
            await self.queue.nack(self.config.queue, batch.receipts)
        except QueueError as exc:
            self.metrics.queue_errors.labels("nack").inc()
            logger.warning(
                "returning %d messages failed (%s); they come back when their leases expire",
                len(batch.receipts),
                exc,
            )
        finally:
            self._forget(batch)

    def _forget(self, batch: _Batch) -> None:
        if batch in self._in_hand:
            self._in_hand.discard(batch)
            self.metrics.messages_in_hand.dec(len(batch.receipts))

    # Keeping leases alive

    async def _extend_loop(self) -> None:
        """Extend the leases of batches held for a third of the visibility timeout."""
        interval = self.config.visibility_timeout_s / 3
        while True:
            await asyncio.sleep(min(interval, 5.0))
            now = time.monotonic()
            for batch in list(self._in_hand):
                if now - batch.extended_at < interval:
                    continue
                try:
                    results = await self.queue.extend(
                        self.config.queue,
                        batch.receipts,
                        visibility_timeout_s=self.config.visibility_timeout_s,
                    )
                except QueueError as exc:
                    self.metrics.queue_errors.labels("extend").inc()
                    logger.warning("extending %d leases failed: %s", len(batch.receipts), exc)
                    continue
                batch.extended_at = now
                self._count_lost_receipts("extend", results)

    # Helpers

    def _count_lost_receipts(self, verb: str, results: Sequence[object]) -> None:
        lost = sum(1 for result in results if not getattr(result, "ok", False))
        if lost:
            self.metrics.receipts_lost.labels(verb).inc(lost)
            logger.info(
                "%s: %d receipts were stale or not found (their leases had expired)", verb, lost
            )

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.config.max_backoff_s, self.config.initial_backoff_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early on a stop request."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass


def _oldest_published_at(messages: Sequence[LeasedMessage]) -> float | None:
    # The queue server writes every published_at in one fixed-width UTC form, so
    # the smallest text is the oldest time and only that one is parsed.
    if not messages:
        return None
    try:
        return datetime.fromisoformat(min(message.published_at for message in messages)).timestamp()
    except (TypeError, ValueError):
        pass
    oldest: float | None = None
    for message in messages:
        try:
            published = datetime.fromisoformat(message.published_at).timestamp()
        except (TypeError, ValueError):
            continue
        if oldest is None or published < oldest:
            oldest = published
    return oldest


def _short_error(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    first_line = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"{type(original).__name__}: {first_line}"
