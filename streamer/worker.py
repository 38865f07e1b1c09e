"""The streamer's control loop: lease a shard, publish its rows, schedule its next pass.

See the package docstring for the protocol on the control queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import orjson

from streamer.dcgm_csv import CsvFormatError, CsvHeader, ParsedRow, RejectedRow, RowCache, read_header
from streamer.metrics import RejectReporter, StreamerMetrics
from streamer.pacing import RateLimiter
from streamer.shards import (
    RUN_KIND,
    RunMessage,
    ShardMessage,
    new_run_id,
    plan_shards,
    run_key,
    source_name,
)
from streamer.stamps import ProcessingClock
from telemetry.queue_client import LeasedMessage, OutgoingMessage, QueueClient
from telemetry.record import TELEMETRY_QUEUE
from telemetry.settings import InvalidConfig

__all__ = ["StreamerConfig", "Streamer", "StreamerError", "CONTROL_QUEUE"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Default name of the queue that contains the shard messages.
CONTROL_QUEUE = "telemetry.shards"

#: Maximum rows in one publish request, the queue's own limit.
MAX_BATCH_SIZE = 1000

#: Maximum shards one streamer works on at the same time.
MAX_CONCURRENT_SHARDS = 16

# Shard messages are redelivered after every graceful stop and crash of the
# streamer that held them, so they get far more deliveries than the queue's default.
_CONTROL_MAX_DELIVERIES = 1000

# Maximum delay in seconds that the queue accepts on a publish or nack. A shard
# message due later than that is published with this delay and, when leased
# early, handed back until it is due.
_MAX_DELAY_S = 43_200.0

# Run keys tried before giving up; each one is taken only by a run that finished
# within the queue's deduplication window.
_MAX_RUN_KEYS = 100


class StreamerError(Exception):
    """The streamer cannot start or go on: a configuration or input problem to fix."""


class ShardOutcome(StrEnum):
    """Outcome of the work on one leased shard."""

    COMPLETED = "completed"
    STOPPED = "stopped"
    LEASE_LOST = "lease_lost"


@dataclass(frozen=True, slots=True)
class StreamerConfig:
    """Settings of one streamer; times are in seconds.

    ``interval_s``, ``passes`` and ``rows_per_shard`` apply only when this streamer
    creates the run; streamers that join a run follow the values in its shard
    messages. ``rate`` (rows per second, 0 for no cap) and ``batch_size`` are per
    streamer.
    """

    csv_path: Path
    interval_s: float = 1.0
    rate: float = 0.0
    batch_size: int = MAX_BATCH_SIZE
    passes: int = 0
    #: Rows in one shard: one publish request of the largest size, so each shard's
    #: three control-queue requests are shared by as many rows as one publish takes.
    rows_per_shard: int = MAX_BATCH_SIZE
    control_queue: str = CONTROL_QUEUE
    telemetry_queue: str = TELEMETRY_QUEUE
    lease_timeout_s: float = 10.0
    lease_wait_s: float = 1.0
    reject_log_interval_s: float = 10.0
    #: How long a streamer that leases only shards of another file hands them back
    #: before it drops them. A control queue left over from an earlier file, or from
    #: this file before it changed, then cannot stall streaming forever.
    foreign_takeover_s: float = 60.0
    #: Shards one streamer works on at the same time. With more than one, the
    #: control-queue requests of one shard (lease, next pass, ack) overlap the
    #: publishing of another. Each of those requests waits for the queue's fsync,
    #: so one streamer with interval 0 published about 12 % more rows per second
    #: with 4 than with 2 on 2 vCPUs (``make bench-e2e``, 1 streamer).
    concurrent_shards: int = 4
    #: Rows of shards already read that are kept for the next passes while the
    #: file is unchanged, 0 for none (see ``streamer.dcgm_csv.RowCache``).
    cache_rows: int = 20_000

    def __post_init__(self) -> None:
        """Raise ``InvalidConfig`` for the first option out of its range."""
        if self.interval_s < 0:
            raise InvalidConfig("interval_s", self.interval_s, "0 or more seconds")
        if self.rate < 0:
            raise InvalidConfig("rate", self.rate, "0 or more rows per second")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise InvalidConfig("batch_size", self.batch_size, f"1 to {MAX_BATCH_SIZE}")
        if self.passes < 0:
            raise InvalidConfig("passes", self.passes, "0 or more")
        if self.rows_per_shard < 1:
            raise InvalidConfig("rows_per_shard", self.rows_per_shard, "1 or more")
        if self.lease_timeout_s < 2:
            raise InvalidConfig("lease_timeout_s", self.lease_timeout_s, "2 or more seconds")
        if self.foreign_takeover_s <= 0:
            raise InvalidConfig("foreign_takeover_s", self.foreign_takeover_s, "more than 0 seconds")
        if not 1 <= self.concurrent_shards <= MAX_CONCURRENT_SHARDS:
            raise InvalidConfig("concurrent_shards", self.concurrent_shards, f"1 to {MAX_CONCURRENT_SHARDS}")
        if self.cache_rows < 0:
            raise InvalidConfig("cache_rows", self.cache_rows, "0 or more")


class Streamer:
    """Publish the rows of one CSV dump to the telemetry queue, sharing the work with its peers.

    ``run()`` returns when a stop was requested (after handing back the shard in
    hand) or, for a run with a fixed number of passes, once the control queue
    contains no message. It raises ``StreamerError`` when the CSV file is missing or
    has no valid header.
    """

    def __init__(
        self,
        queue: QueueClient,
        config: StreamerConfig,
        *,
        metrics: StreamerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.config = config
        self.metrics = metrics or StreamerMetrics()
        self.ready = False
        self._clock = clock
        self._stop = asyncio.Event()
        self._rate = RateLimiter(config.rate)
        self._processing_clock = ProcessingClock()
        self._source = source_name(config.csv_path)
        self._rejects = RejectReporter(
            self.metrics, self._source, interval_s=config.reject_log_interval_s
        )
        self._last_lag_log = float("-inf")
        self._last_mismatch_log = float("-inf")
        # When this streamer began leasing only shards of other files; None after an own shard.
        self._foreign_since: float | None = None
        self._took_over = False
        self._header: CsvHeader | None = None
        self._rows = RowCache(config.cache_rows)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Ask ``run()`` to finish the batch in flight, hand its shard back and return."""
        if not self._stop.is_set():
            logger.info("stop requested: finishing the batch in flight, if any")
        self._stop.set()

    def check_input(self) -> None:
        """Read the CSV header now; raise ``StreamerError`` when the file cannot be streamed."""
        self._header = self._read_header()

    async def run(self) -> None:
        """Create the queues, join or create the run, then lease and publish shards until stopped."""
        header = self._header or self._read_header()
        # NOTE: the size is read once, and a run's shards cover the file as it was
        # when the run started, so rows appended later are not streamed until a restart.
        file_size = self.config.csv_path.stat().st_size
        await self._create_queues()
        await self._join_or_create_run(header, file_size)
        self.ready = True
        try:
            async with asyncio.TaskGroup() as workers:
                for _ in range(self.config.concurrent_shards):
                    workers.create_task(self._work_on_shards(header, file_size))
        except BaseExceptionGroup as group:
            # A worker's error ends the others. run() raises that error itself, not a group.
            raise group.exceptions[0] from None
        finally:
            self.ready = False

    async def _work_on_shards(self, header: CsvHeader, file_size: int) -> None:
        """Lease and publish shards, one at a time, until stopped or the last pass is done.

        ``run()`` runs ``concurrent_shards`` of these side by side. They share the
        work through the control queue as separate streamers do.
        """
        while not self._stop.is_set():
            leased = await self._unless_stopped(
                self.queue.lease(
                    self.config.control_queue,
                    max_messages=1,
                    wait_s=self.config.lease_wait_s,
                    visibility_timeout_s=self.config.lease_timeout_s,
                )
            )
            if leased is None:
                break
            if leased:
                await self._handle(leased[0], header, file_size)
                continue
            if await self._control_queue_empty():
                if self.config.passes and not self._took_over:
                    logger.info("every shard of the last pass is done: stopping")
                    break
                # After a takeover the queue is empty because foreign shards were
                # dropped, not because this file's passes are done.
                self._took_over = False
                await self._join_or_create_run(header, file_size)

    async def _unless_stopped(self, call: Coroutine[Any, Any, T]) -> T | None:
        """Await ``call`` unless a stop is requested first; then cancel it and return ``None``.

        Used for the idle lease poll, which holds no work and may be retrying
        against an unreachable queue. A lease cancelled just as the queue granted it
        returns to the queue when its visibility timeout ends.
        """
        task = asyncio.ensure_future(call)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            return None
        return task.result()

    def _read_header(self) -> CsvHeader:
        try:
            return read_header(self.config.csv_path)
        except CsvFormatError as exc:
            raise StreamerError(str(exc)) from exc

    async def _create_queues(self) -> None:
        await self.queue.create_queue(self.config.telemetry_queue)
        await self.queue.create_queue(
            self.config.control_queue,
            visibility_timeout_s=self.config.lease_timeout_s,
            max_deliveries=_CONTROL_MAX_DELIVERIES,
        )

    async def _control_queue_empty(self) -> bool:
        stats = (await self.queue.get_queue(self.config.control_queue))["stats"]
        return int(stats["ready"]) + int(stats["leased"]) + int(stats["delayed"]) == 0

    async def _join_or_create_run(self, header: CsvHeader, file_size: int) -> None:
        """Publish a run-creation message unless the control queue already contains a run.

        Streamers started together publish under the same key, so the queue stores
        the first message and reports the others as duplicates. The streamer that
        leases the stored message publishes pass 0 (see ``_start_run``).

        A duplicate with an empty control queue means that the key belongs to a run
        that finished within the queue's deduplication window, so the next key in
        the sequence is tried. Every streamer walks the same sequence, so they still
        agree on one run.
        """
        plan: list[list[int]] | None = None
        for attempt in range(_MAX_RUN_KEYS):
            if not await self._control_queue_empty():
                logger.info("joining the run in progress on queue %s", self.config.control_queue)
                return
            if plan is None:
                ranges = await asyncio.to_thread(
                    plan_shards, self.config.csv_path, header, rows_per_shard=self.config.rows_per_shard
                )
                if not ranges:
                    raise StreamerError(f"CSV file {str(self.config.csv_path)!r} has no records to stream")
                plan = [[r.start_offset, r.end_offset, r.start_line] for r in ranges]

            now = self._clock()
            run = RunMessage(
                run_id=new_run_id(now),
                source=self._source,
                file_size=file_size,
                passes=self.config.passes,
                run_start=now,
                interval_s=self.config.interval_s,
                shards=plan,
            )
            key = run_key(self._source, file_size, attempt)
            results = await self.queue.publish(
                self.config.control_queue, [OutgoingMessage(body=run.to_body(), key=key)]
            )
            if not results[0].duplicate:
                logger.info(
                    "created run %s of %s: %d shards of up to %d rows, %s passes every %.3f s",
                    run.run_id,
                    self._source,
                    len(plan),
                    self.config.rows_per_shard,
                    self.config.passes or "unlimited",
                    self.config.interval_s,
                )
                return
        raise StreamerError(
            f"every run key of {self._source!r} up to attempt {_MAX_RUN_KEYS} is taken; "
            "wait for the queue's deduplication window to pass"
        )

    async def _start_run(self, leased: LeasedMessage) -> None:
        """Publish pass 0's shard messages of a run-creation message, then ack it.

        The shard messages' keys make this idempotent, so a crash half-way only
        means the next streamer to lease the message publishes them again.
        """
        queue = self.config.control_queue
        try:
            run = RunMessage.from_body(leased.body)
        except ValueError as exc:
            await self._dead_letter(leased, exc)
            return
        shards = run.shard_messages()
        for first in range(0, len(shards), MAX_BATCH_SIZE):
            chunk = shards[first:first + MAX_BATCH_SIZE]
            await self.queue.publish(queue, [OutgoingMessage(body=m.to_body(), key=m.key) for m in chunk])
        await self.queue.ack(queue, [leased.receipt])
        logger.info("started run %s: published %d shards of pass 0", run.run_id, len(shards))

    async def _handle(self, leased: LeasedMessage, header: CsvHeader, file_size: int) -> None:
        body = leased.body
        if isinstance(body, dict) and body.get("kind") == RUN_KIND:
            await self._start_run(leased)
            return
        try:
            shard = ShardMessage.from_body(body)
        except ValueError as exc:
            await self._dead_letter(leased, exc)
            return
        if shard.source != self._source or shard.file_size != file_size:
            await self._hand_back_foreign(leased, shard, file_size)
            return
        self._foreign_since = None
        if self._stop.is_set():
            await self._finish(leased, shard, ShardOutcome.STOPPED)
            return
        early_s = shard.due_at - self._clock()
        if early_s > 1.0:
            # Leased before its pass is due: a delay longer than the queue allows,
            # or another streamer's clock runs ahead of this one.
            await self.queue.nack(self.config.control_queue, [leased.receipt], delay_s=min(early_s, _MAX_DELAY_S))
            return

        self._report_lag(shard)
        self.metrics.shards_held.inc()
        try:
            outcome = await self._work_under_lease(leased, shard, header)
        finally:
            self.metrics.shards_held.dec()
        await self._finish(leased, shard, outcome)

    async def _dead_letter(self, leased: LeasedMessage, error: ValueError) -> None:
        queue = self.config.control_queue
        logger.error("dead-lettering the invalid message %s of queue %s: %s", leased.id, queue, error)
        await self.queue.nack(queue, [leased.receipt], dead_letter=True, reason=str(error)[:200])

    async def _finish(self, leased: LeasedMessage, shard: ShardMessage, outcome: ShardOutcome) -> None:
        queue = self.config.control_queue
        if outcome is ShardOutcome.LEASE_LOST:
            logger.warning(
                "lost the lease on shard %d pass %d; another streamer publishes it again",
                shard.index,
                shard.pass_index,
            )
            return
        if outcome is ShardOutcome.STOPPED:
            await self.queue.nack(queue, [leased.receipt], delay_s=0)
            logger.info("handed back shard %d pass %d", shard.index, shard.pass_index)
            return

        if not shard.is_last_pass:
            following = shard.next_pass()
            delay = min(max(0.0, following.due_at - self._clock()), _MAX_DELAY_S)
            await self.queue.publish(
                queue, [OutgoingMessage(body=following.to_body(), key=following.key, delay_s=round(delay, 3))]
            )
        results = await self.queue.ack(queue, [leased.receipt])
        self.metrics.shards_completed.inc()
        if not results[0].ok:
            # The lease ran out while the rows were published and another streamer
            # has the shard now. It publishes the same keys, so nothing is stored twice.
            logger.warning(
                "ack of shard %d pass %d returned %s", shard.index, shard.pass_index, results[0].status
            )
        logger.debug("completed shard %d pass %d", shard.index, shard.pass_index)

    async def _hand_back_foreign(self, leased: LeasedMessage, shard: ShardMessage, file_size: int) -> None:
        """Hand a shard of another file back to the queue, or drop it once the takeover time has passed.

        Streamers of two files sharing one control queue is a misconfiguration, but
        a queue left over from an earlier file is not: no streamer serves its shards
        any more. After ``foreign_takeover_s`` with no shard of its own, the streamer
        drops the foreign shards, and once the queue is empty it creates a run of
        its own file.
        """
        queue = self.config.control_queue
        now = time.monotonic()
        if self._foreign_since is None:
            self._foreign_since = now
        waited = now - self._foreign_since
        if waited >= self.config.foreign_takeover_s:
            logger.warning(
                "dropping shard %d pass %d of %s (%d bytes) from queue %s: for %.0f s this streamer "
                "leased only shards of other files, so the queue now streams %s (%d bytes)",
                shard.index,
                shard.pass_index,
                shard.source,
                shard.file_size,
                queue,
                waited,
                self._source,
                file_size,
            )
            await self.queue.ack(queue, [leased.receipt])
            self._took_over = True
            return
        if now - self._last_mismatch_log >= 10.0:
            self._last_mismatch_log = now
            logger.error(
                "queue %s contains shards of %s (%d bytes), but this streamer reads %s (%d bytes); "
                "give each CSV file its own control queue. Shards of other files are dropped "
                "after %.0f s without a shard of this file",
                queue,
                shard.source,
                shard.file_size,
                self._source,
                file_size,
                self.config.foreign_takeover_s,
            )
        await self.queue.nack(queue, [leased.receipt], delay_s=1.0)

    def _report_lag(self, shard: ShardMessage) -> None:
        if shard.interval_s == 0:
            # Without an interval every pass is due at once, so there is no schedule to fall behind.
            return
        lag = max(0.0, self._clock() - shard.due_at)
        self.metrics.schedule_lag.set(lag)
        tolerance = max(1.0, shard.interval_s)
        now = time.monotonic()
        if lag > tolerance and now - self._last_lag_log >= 10.0:
            self._last_lag_log = now
            logger.warning(
                "behind schedule: shard %d of pass %d starts %.1f s late",
                shard.index,
                shard.pass_index,
                lag,
            )

    async def _work_under_lease(
        self, leased: LeasedMessage, shard: ShardMessage, header: CsvHeader
    ) -> ShardOutcome:
        lease_lost = asyncio.Event()
        keeper = asyncio.create_task(self._keep_lease(leased.receipt, lease_lost))
        try:
            return await self._publish_shard(shard, header, lease_lost)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep_lease(self, receipt: str, lease_lost: asyncio.Event) -> None:
        """Extend the lease every third of its timeout until cancelled or the lease is lost."""
        period = self.config.lease_timeout_s / 3
        while True:
            await asyncio.sleep(period)
            results = await self.queue.extend(
                self.config.control_queue, [receipt], visibility_timeout_s=self.config.lease_timeout_s
            )
            if not results[0].ok:
                lease_lost.set()
                return

    async def _publish_shard(
        self, shard: ShardMessage, header: CsvHeader, lease_lost: asyncio.Event
    ) -> ShardOutcome:
        """Publish the shard's rows in batches, with one batch in flight while the next is read.

        After each batch the streamer checks for a lost lease and a stop request, so
        a stop sends no batch beyond the one in flight.
        """
        rows = self._rows.read(
            self.config.csv_path,
            header,
            start_offset=shard.start_offset,
            start_line=shard.start_line,
            end_offset=shard.end_offset,
        )
        in_flight: asyncio.Task[None] | None = None
        try:
            for batch in self._batches(rows):
                await self._rate.acquire(len(batch))
                messages = self._messages(shard, batch)
                if in_flight is not None:
                    await in_flight
                    if lease_lost.is_set():
                        return ShardOutcome.LEASE_LOST
                    if self._stop.is_set():
                        return ShardOutcome.STOPPED
                in_flight = asyncio.create_task(self._publish_batch(messages))
            if in_flight is not None:
                await in_flight
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()
        return ShardOutcome.LEASE_LOST if lease_lost.is_set() else ShardOutcome.COMPLETED

    def _batches(self, rows: Iterator[ParsedRow | RejectedRow]) -> Iterator[list[ParsedRow]]:
        """Group valid rows into batches, counting every row read and reporting rejected ones.

        ``rows_read`` grows once per batch rather than once per row, because a
        Prometheus counter takes a lock on each increment.
        """
        batch: list[ParsedRow] = []
        read = 0
        for row in rows:
            read += 1
            if isinstance(row, RejectedRow):
                self._rejects.report(row)
                continue
            batch.append(row)
            if len(batch) == self.config.batch_size:
                self.metrics.rows_read.inc(read)
                read = 0
                yield batch
                batch = []
        if read:
            self.metrics.rows_read.inc(read)
        if batch:
            yield batch

    def _messages(self, shard: ShardMessage, batch: list[ParsedRow]) -> list[dict[str, Any]]:
        """Build the publish items of a batch: each row's body with its own processing time and key.

        The items are the JSON form of ``OutgoingMessage``, built directly because
        the streamer makes one per row. Each body is already encoded
        (``ParsedRow.message_json``), and orjson copies a ``Fragment`` as it is.
        """
        key_prefix = shard.row_key_prefix
        stamp = self._processing_clock.stamp
        fragment = orjson.Fragment
        messages = []
        for row in batch:
            key = f"{key_prefix}{row.line}"
            messages.append({"body": fragment(row.message_json(timestamp=stamp(), key=key)), "key": key})
        return messages

    async def _publish_batch(self, messages: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        results = await self.queue.publish(self.config.telemetry_queue, messages)
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        self.metrics.rows_published.inc(len(results))
        duplicates = sum(1 for result in results if result.duplicate)
        if duplicates:
            self.metrics.rows_duplicate.inc(duplicates)
