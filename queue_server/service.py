"""The queue service: the broker's rules joined to the write-ahead log and to time.

HTTP handlers call one method per API operation. Each method changes the
broker, appends what changed to the log, and returns after the log is durable
when the caller must be able to rely on the change (publish, ack, nack, redrive,
queue changes). Long-polls wait here, and a background task drives lease expiry,
delays, retention and the free-space check.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from queue_server.core.batch import Batch, message_key
from queue_server.core.broker import DEDUP_WINDOW_S, Broker, LeasedMessage, Transfer
from queue_server.core.config import QueueConfig
from queue_server.core.queue import Queue, Slot
from queue_server.errors import DiskFull, QueueServerError, ShuttingDown, StorageError
from queue_server.replay import replay
from queue_server.wal.log import DEFAULT_SEGMENT_BYTES, FsyncPolicy, Position, WriteAheadLog
from queue_server.wal.records import PublishHeader, RecordType, encode_json, encode_publish

logger = logging.getLogger(__name__)

TICK_S = 0.05
RETENTION_EVERY_S = 10.0
DISK_CHECK_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class Extension:
    """State another feature keeps in the log: its record replay rules and checkpoint."""

    handlers: dict[RecordType, Callable[[dict[str, Any]], None]]
    checkpoint: Callable[[], Any]
    restore: Callable[[Any], None]
    #: Called when a queue is deleted; returns records to log before the deletion's own.
    queue_deleted: Callable[[str], list[bytes]] | None = None


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """Settings of the service; see ``queue_server.settings`` for their variables."""

    data_dir: Path
    fsync: FsyncPolicy = FsyncPolicy.ALWAYS
    fsync_interval_s: float = 0.2
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    #: Publishing is rejected with 507 while the data directory's file system has less free space than this (bytes).
    min_free_bytes: int = 256 * 1024 * 1024
    dedup_window_s: float = DEDUP_WINDOW_S


class QueueService:
    def __init__(self, options: ServiceOptions) -> None:
        self.options = options
        self.segment_batches: Counter[int] = Counter()
        self.broker = Broker(dedup_window_s=options.dedup_window_s, on_batch_finished=self._batch_finished)
        self.wal = WriteAheadLog(
            options.data_dir,
            fsync=options.fsync,
            segment_bytes=options.segment_bytes,
            sync_listener=self._observe_sync,
        )
        self.sync_durations: list[float] = []
        self.sync_observer: Any = None
        self.ready = False
        self.stopping = False
        self.disk_low = False
        self.long_polls = 0
        #: Requests inside a handler now; shutdown waits for them before closing connections.
        self.active_requests = 0
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._last_retention = 0.0
        self._last_disk_check = 0.0
        self._extensions: dict[str, Extension] = {}

    # Lifecycle

    def register_extension(self, name: str, extension: "Extension") -> None:
        """Let another feature (push subscriptions) keep state in the log; call before ``open``.

        The extension's records are replayed through ``extension.handlers``, and
        each new segment's checkpoint stores ``extension.checkpoint()`` under
        ``name``, handed back to ``extension.restore`` at start.
        """
        if self.ready:
            raise RuntimeError(f"extension {name!r} must be registered before the service opens")
        self._extensions[name] = extension

    def _checkpoint_payload(self) -> bytes:
        checkpoint = self.broker.checkpoint()
        if self._extensions:
            checkpoint["extensions"] = {name: ext.checkpoint() for name, ext in self._extensions.items()}
        return encode_json(RecordType.CHECKPOINT, checkpoint)

    def _restore_extensions(self, stored: dict[str, Any]) -> None:
        for name, extension in self._extensions.items():
            if name in stored:
                extension.restore(stored[name])

    async def append_durable(self, payload: bytes) -> None:
        """Append one record (see ``wal.records``) and return once it is durable."""
        self._check_accepting()
        _, end = self._append(payload)
        await self.wal.wait_durable(end)

    def open(self) -> None:
        """Lock the data directory, replay the log and start a new segment (blocking)."""
        started = time.perf_counter()
        self.wal.lock()
        now = time.time()
        handlers = {kind: handler for ext in self._extensions.values() for kind, handler in ext.handlers.items()}
        count = replay(
            self.broker,
            self.wal.recover(),
            now,
            self.segment_batches,
            handlers=handlers,
            restore_extensions=self._restore_extensions,
        )
        self.broker.epoch += 1
        self.broker.apply_retention(now)
        self.wal.start_segment(self._checkpoint_payload())
        self._collect_segments()
        self._check_disk(now)
        messages = sum(queue.live_messages for queue in self.broker.queues.values())
        logger.info(
            "recovered %d log records, %d queues and %d live messages from %s in %.2f s (epoch %d)",
            count,
            len(self.broker.queues),
            messages,
            self.options.data_dir,
            time.perf_counter() - started,
            self.broker.epoch,
        )

    async def start(self) -> None:
        """Start background work on the running loop; call after ``open``."""
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())
        self.ready = True

    def begin_shutdown(self) -> None:
        """Stop accepting work and return an empty result to every waiting long-poll."""
        if self.stopping:
            return
        self.stopping = True
        self.ready = False
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no request is inside a handler; return False if ``timeout_s`` passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.active_requests and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return self.active_requests == 0

    async def close(self) -> None:
        """Finish pending log work, fsync and close the log."""
        self.begin_shutdown()
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.wal.close()
        logger.info("write-ahead log flushed and closed")

    def _check_accepting(self) -> None:
        if self.stopping:
            raise ShuttingDown("the queue server is shutting down; retry against another node or later")

    # Queues

    async def put_queue(self, name: str, fields: dict[str, Any]) -> tuple[QueueConfig, bool]:
        self._check_accepting()
        existed = name in self.broker.queues
        config, created = self.broker.put_queue(name, fields)
        _, end = self._append(encode_json(RecordType.QUEUE_PUT, {"name": name, "config": config.to_json()}))
        for queue_name in created:
            logger.info("queue %r created", queue_name)
        if existed:
            # Clients create their queues at every start with an empty PUT, which changes nothing.
            logger.log(logging.INFO if fields else logging.DEBUG, "queue %r updated: %s", name, fields)
        await self.wal.wait_durable(end)
        return config, not existed

    async def delete_queue(self, name: str) -> None:
        self._check_accepting()
        self.broker.delete_queue(name)
        for extension in self._extensions.values():
            if extension.queue_deleted is not None:
                for payload in extension.queue_deleted(name):
                    self._append(payload)
        _, end = self._append(encode_json(RecordType.QUEUE_DELETE, {"name": name}))
        self._wake(name)
        logger.info("queue %r deleted", name)
        await self.wal.wait_durable(end)

    def queue(self, name: str) -> Queue:
        return self.broker.queue(name)

    # Publishing

    async def publish(
        self, name: str, bodies: Sequence[bytes], keys: Sequence[str | None], delays: Sequence[float]
    ) -> list[tuple[str, bool]]:
        """Store a batch; return ``(id, duplicate)`` per message once it is durable."""
        self._check_accepting()
        if self.disk_low:
            raise DiskFull(
                f"the file system of {str(self.options.data_dir)!r} has less than "
                f"{self.options.min_free_bytes} bytes free; free space or add capacity",
                retry_after_s=5,
            )
        now = time.time()
        plan = self.broker.prepare_publish(name, [len(b) for b in bodies], keys, delays, now)
        if not plan.stored:
            await self.wal.wait_durable(self.wal.end_position)
            return plan.results

        header = PublishHeader(name, plan.seq, now, plan.key_hashes, plan.dues)
        payload, offsets, body_start = encode_publish(header, [bodies[i] for i in plan.stored])
        try:
            position, end = self._append(payload)
        except StorageError:
            self.broker.abort_publish(plan)
            raise
        location = Position(position.segment, position.offset + body_start)
        batch = Batch(plan.seq, now, offsets, location, delayed=frozenset(plan.dues))
        self.segment_batches[location.segment] += 1
        await self.wal.wait_durable(end)
        self.broker.commit_publish(plan, batch)
        self._wake(name)
        return plan.results

    # Leasing

    async def lease(
        self, name: str, max_messages: int, wait_s: float, visibility_timeout_s: float | None
    ) -> bytes:
        """Long-poll for messages; return the encoded ``{"messages": [...]}`` response body."""
        self._check_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            leased, transfers = self.broker.lease(name, max_messages, visibility_timeout_s, time.time())
            self._start_transfers(transfers)
            if leased:
                keys = [message_key(m.batch.seq, m.index) for m in leased]
                self._append(encode_json(RecordType.LEASE, {"q": name, "k": keys}))
                return self._encode_leases(leased)
            remaining = deadline - loop.time()
            if remaining <= 0 or self.stopping:
                return b'{"messages":[]}'
            await self._wait_for_messages(name, remaining)

    async def _wait_for_messages(self, name: str, timeout: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(name, set())
        waiters.add(future)
        self.long_polls += 1
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self.long_polls -= 1
            waiters.discard(future)
            if not waiters:
                self._waiters.pop(name, None)

    def _wake(self, name: str) -> None:
        for future in self._waiters.get(name, ()):
            if not future.done():
                future.set_result(None)

    def _encode_leases(self, leased: list[LeasedMessage]) -> bytes:
        """Return the ``{"messages": [...]}`` response body, with each body as stored in the log.

        Messages come in runs of neighbours from one batch, read with one ``pread``
        a run. The ids and receipts follow ``core.batch.format_message_id`` and
        ``core.receipts.format_receipt``, formatted from one bytes template per
        run, because this loop runs per message. Each template begins by closing
        the message before it, so a message adds two parts: its fields and its body.
        """
        if not leased:
            return b'{"messages":[]}'
        epoch = leased[0].epoch
        parts: list[bytes] = []
        append = parts.append
        for batch, first, last, data in self._read_runs([(m.batch, m.index) for m in leased]):
            seq = batch.seq
            fields = (
                f'}},{{"id":"{seq}-%d","receipt":"{seq}-%d-%d-{epoch}","deliveries":%d,'
                f'"published_at":"{batch.published_text}",'
            ).encode()
            template = fields + b'"body":'
            offsets = batch.offsets
            delivery_counts = batch.deliveries
            origins = batch.origins
            base = offsets[first]
            for index in range(first, last + 1):
                deliveries = delivery_counts[index]
                values = (index, index, deliveries, deliveries)
                if origins is None:
                    append(template % values)
                else:
                    dead_letter = orjson.dumps(origins[index].to_json())
                    append(fields % values + b'"dead_letter":' + dead_letter + b',"body":')
                append(data[offsets[index] - base : offsets[index + 1] - base])
        # The first template's "}," closes no message: it becomes the opening.
        parts[0] = b'{"messages":[' + parts[0][2:]
        append(b"}]}")
        return b"".join(parts)

    def _read_runs(self, slots: Sequence[Slot]) -> list[tuple[Batch, int, int, bytes]]:
        """Group slots into runs of neighbouring messages of a batch; read each run with one ``pread``.

        Returns ``(batch, first index, last index, bytes of the run's bodies)`` per run, in order.
        """
        runs: list[tuple[Batch, int, int, bytes]] = []
        position = 0
        while position < len(slots):
            batch, first = slots[position]
            last = first
            while (
                position + (last - first) + 1 < len(slots)
                and slots[position + (last - first) + 1][0] is batch
                and slots[position + (last - first) + 1][1] == last + 1
            ):
                last += 1
            offsets = batch.offsets
            runs.append((batch, first, last, self.wal.read(batch.location, offsets[first], offsets[last + 1])))
            position += last - first + 1
        return runs

    def _read_bodies(self, slots: Sequence[Slot]) -> list[bytes]:
        """Read message bodies, one ``pread`` per run of neighbouring messages of a batch."""
        bodies: list[bytes] = []
        for batch, first, last, data in self._read_runs(slots):
            offsets = batch.offsets
            base = offsets[first]
            for index in range(first, last + 1):
                bodies.append(data[offsets[index] - base : offsets[index + 1] - base])
        return bodies

    # Receipts

    async def ack(self, name: str, receipts: Sequence[Any]) -> list[tuple[Any, str]]:
        self._check_accepting()
        outcome = self.broker.ack(name, receipts)
        if outcome.keys:
            _, end = self._append(encode_json(RecordType.ACK, {"q": name, "k": outcome.keys}))
            await self.wal.wait_durable(end)
        return outcome.results

    async def nack(
        self, name: str, receipts: Sequence[Any], *, delay_s: float, dead_letter: bool, reason: str | None
    ) -> list[tuple[Any, str]]:
        self._check_accepting()
        now = time.time()
        outcome = self.broker.nack(
            name, receipts, delay_s=delay_s, dead_letter=dead_letter, reason=reason, now=now
        )
        if outcome.transfers:
            await self._run_transfers(outcome.transfers)
        elif outcome.keys:
            record: dict[str, Any] = {"q": name, "k": outcome.keys}
            if delay_s > 0:
                record["due"] = now + delay_s
            _, end = self._append(encode_json(RecordType.NACK, record))
            self._wake(name)
            await self.wal.wait_durable(end)
        return outcome.results

    async def extend(self, name: str, receipts: Sequence[Any], visibility_timeout_s: float) -> list[tuple[Any, str]]:
        self._check_accepting()
        return self.broker.extend(name, receipts, visibility_timeout_s, time.time()).results

    async def redrive(self, name: str, max_messages: int | None) -> int:
        self._check_accepting()
        transfers = self.broker.redrive(name, max_messages)
        await self._run_transfers(transfers)
        moved = sum(len(t.slots) for t in transfers)
        if moved:
            logger.info("redrove %d messages out of dead-letter queue %r", moved, name)
        return moved

    # Transfers (dead-lettering and redrive)

    def _start_transfers(self, transfers: list[Transfer]) -> None:
        if not transfers:
            return
        task = asyncio.get_running_loop().create_task(self._run_transfers(transfers))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("moving messages between queues failed", exc_info=task.exception())

    async def _run_transfers(self, transfers: list[Transfer]) -> None:
        pending = []
        now = time.time()
        for transfer in transfers:
            bodies = self._read_bodies(transfer.slots)
            keys = [message_key(batch.seq, index) for batch, index in transfer.slots]
            header = PublishHeader(
                transfer.target,
                transfer.seq,
                now,
                [],
                {},
                origins=None if transfer.origins is None else [o.to_json() for o in transfer.origins],
                moved={"from": transfer.source, "keys": keys, "kind": transfer.kind},
            )
            payload, offsets, body_start = encode_publish(header, bodies)
            position, end = self._append(payload)
            location = Position(position.segment, position.offset + body_start)
            batch = Batch(transfer.seq, now, offsets, location, origins=transfer.origins)
            self.segment_batches[location.segment] += 1
            pending.append((transfer, batch, end))
            if transfer.kind == "dead_letter":
                logger.info(
                    "dead-lettered %d messages from %r to %r (%s)",
                    len(keys),
                    transfer.source,
                    transfer.target,
                    transfer.origins[0].reason if transfer.origins else None,
                )
        if pending:
            await self.wal.wait_durable(max(end for _, _, end in pending))
        for transfer, batch, _ in pending:
            self.broker.commit_transfer(transfer, batch)
            self._wake(transfer.target)

    # Log plumbing

    def _append(self, payload: bytes) -> tuple[Position, int]:
        position, end = self.wal.append(payload)
        if self.wal.needs_new_segment():
            self.wal.start_segment(self._checkpoint_payload())
            self._collect_segments()
        return position, end

    def _batch_finished(self, batch: Batch) -> None:
        segment = batch.location.segment
        self.segment_batches[segment] -= 1
        if self.segment_batches[segment] <= 0:
            del self.segment_batches[segment]

    def _collect_segments(self) -> None:
        """Delete the oldest segments once no live batch and no dedup key in the window needs them."""
        now = time.time()
        limit = self.wal.current_segment
        for number, closed_at in self.wal.closed_segments():
            if self.segment_batches.get(number) or closed_at + self.broker.dedup_window_s > now:
                limit = number
                break
        self.wal.delete_segments_before(limit)

    def _observe_sync(self, seconds: float) -> None:
        if self.sync_observer is not None:
            self.sync_observer(seconds)

    # Time

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last_interval_sync = loop.time()
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self._tick(time.time())
                if (
                    self.options.fsync is FsyncPolicy.INTERVAL
                    and loop.time() - last_interval_sync >= self.options.fsync_interval_s
                ):
                    last_interval_sync = loop.time()
                    await self.wal.sync()
            except QueueServerError:
                # Keep the loop alive: without it leases would never expire.
                logger.exception("background queue work failed; retrying in %.2f s", TICK_S)

    def _tick(self, now: float) -> None:
        transfers = self.broker.tick(now)
        self._start_transfers(transfers)
        for name, waiters in list(self._waiters.items()):
            queue = self.broker.queues.get(name)
            if waiters and (queue is None or queue.ready):
                self._wake(name)
        if now - self._last_retention >= RETENTION_EVERY_S:
            self._last_retention = now
            dropped = self.broker.apply_retention(now)
            if dropped:
                logger.info("retention dropped %d messages", dropped)
            self._collect_segments()
        if now - self._last_disk_check >= DISK_CHECK_EVERY_S:
            self._check_disk(now)

    def _check_disk(self, now: float) -> None:
        self._last_disk_check = now
        stats = os.statvfs(self.options.data_dir)
        free = stats.f_bavail * stats.f_frsize
        low = free < self.options.min_free_bytes
        if low and not self.disk_low:
            logger.warning(
                "free space on %s is %d bytes, below %d: publishing is rejected with 507 until space is freed",
                self.options.data_dir,
                free,
                self.options.min_free_bytes,
            )
        elif self.disk_low and not low:
            logger.info("free space on %s is back to %d bytes: publishing resumes", self.options.data_dir, free)
        self.disk_low = low
