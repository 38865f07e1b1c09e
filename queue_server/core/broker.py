"""All queues of one server, dedup keys, sequence numbers and the server epoch.

The broker changes state in memory only. The storage adapter logs what it
reports and replays the log through the same methods at start, so the rules
live here once. Times are seconds since the Unix epoch, passed in by the caller.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from queue_server.core.batch import (
    Batch,
    DeadLetterOrigin,
    format_message_id,
    message_key,
    split_key,
)
from queue_server.core.config import DEAD_LETTER_SUFFIX, QueueConfig, check_queue_name
from queue_server.core.dedup import DedupIndex
from queue_server.core.queue import Queue, Slot
from queue_server.core.receipts import format_receipt, parse_receipts
from queue_server.core.states import LIVE_CODES, READY, Transition
from queue_server.errors import InvalidRequest, QueueFull, QueueNotFound

DEDUP_WINDOW_S = 300.0
MAX_BATCH_MESSAGES = 1000


def key_hash(queue: str, key: str) -> int:
    """Return the 60-bit hash that represents an idempotency key of ``queue``.

    60 bits keep the int objects of the dedup index at their smaller size, and
    a collision among a million keys has a probability below 1e-6.
    """
    digest = hashlib.blake2b(f"{queue}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 4


@dataclass(slots=True)
class PublishPlan:
    """Messages of one publish request that passed the checks and will be stored.

    ``stored`` lists the request positions that get stored (the rest are
    duplicates); ``results`` has one ``(id, duplicate)`` per request position.
    """

    queue: str
    seq: int
    published_at: float
    stored: list[int]
    results: list[tuple[str, bool]]
    key_hashes: list[tuple[int, int]]
    dues: dict[int, float]
    body_bytes: int


@dataclass(slots=True)
class Transfer:
    """Messages leaving ``source`` for ``target``: dead-lettering or redrive.

    The messages are already MOVED in ``source``. The storage adapter copies
    their bodies into a new batch of ``target`` (``seq``) and logs both changes
    in one record, then calls ``Broker.commit_transfer``.
    """

    source: str
    target: str
    seq: int
    slots: list[Slot]
    origins: list[DeadLetterOrigin] | None
    kind: str


@dataclass(slots=True)
class LeasedMessage:
    """One delivery handed out by ``Broker.lease``; the id and receipt strings are built on access."""

    batch: Batch
    index: int
    deliveries: int
    epoch: int

    @property
    def message_id(self) -> str:
        return format_message_id(self.batch.seq, self.index)

    @property
    def receipt(self) -> str:
        return format_receipt(self.batch.seq, self.index, self.deliveries, self.epoch)


@dataclass(slots=True)
class ReceiptOutcome:
    """Per-receipt statuses of an ack, nack or extend, and what to log."""

    results: list[tuple[Any, str]] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)


class Broker:
    """The set of queues and the rules that change them.

    ``on_batch_finished`` is called with each batch whose messages are all
    acked, moved or dropped, so storage can release what holds it.
    """

    def __init__(
        self,
        *,
        epoch: int = 1,
        dedup_window_s: float = DEDUP_WINDOW_S,
        on_batch_finished: Callable[[Batch], None] | None = None,
    ) -> None:
        self.epoch = epoch
        self.next_seq = 1
        self.dedup_window_s = dedup_window_s
        self.queues: dict[str, Queue] = {}
        self._dedup = DedupIndex(dedup_window_s)
        self._on_batch_finished = on_batch_finished

    # Queues

    def queue(self, name: str) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise QueueNotFound(
                f"queue {name!r} does not exist: create it with PUT /v1/queues/{name}"
            )
        return queue

    def put_queue(self, name: str, fields: dict[str, Any]) -> tuple[QueueConfig, list[str]]:
        """Create or update queue ``name``; return its config and the names of queues created.

        A new queue gets the dead-letter queue ``{name}.dlq`` unless ``fields`` name
        another one or null. A dead-letter queue that does not exist yet is created
        without a dead-letter queue of its own.
        """
        check_queue_name(name)
        existing = self.queues.get(name)
        created: list[str] = []
        if existing is None:
            defaults = QueueConfig(dead_letter_queue=_default_dead_letter_name(name))
            config = defaults.updated(fields)
        else:
            config = existing.config.updated(fields)
        if config.dead_letter_queue == name:
            raise InvalidRequest(
                f"dead_letter_queue={name!r} is invalid: a queue cannot be its own "
                "dead-letter queue; name another queue or null"
            )

        if existing is None:
            self.queues[name] = self._new_queue(name, config)
            created.append(name)
        else:
            existing.config = config
        dead_letter = config.dead_letter_queue
        if dead_letter is not None and dead_letter not in self.queues:
            self.queues[dead_letter] = self._new_queue(dead_letter, QueueConfig())
            created.append(dead_letter)
        return config, created

    def _new_queue(self, name: str, config: QueueConfig) -> Queue:
        return Queue(name, config, on_batch_finished=self._on_batch_finished)

    def delete_queue(self, name: str) -> None:
        queue = self.queue(name)
        queue.drop_all()
        del self.queues[name]
        # Queues that dead-lettered into the deleted queue stop dead-lettering.
        for other in self.queues.values():
            if other.config.dead_letter_queue == name:
                other.config = other.config.updated({"dead_letter_queue": None})

    # Publishing

    def allocate_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def prepare_publish(
        self,
        name: str,
        sizes: Sequence[int],
        keys: Sequence[str | None],
        delays: Sequence[float],
        now: float,
    ) -> PublishPlan:
        """Check limits and dedup for a publish; reserve room and keys for the new batch.

        Raises ``QueueNotFound`` or ``QueueFull`` without changing any state. The
        caller logs the batch and then calls ``commit_publish`` (or ``abort_publish``).
        """
        queue = self.queue(name)
        self.expire_dedup(now)
        seq = self.next_seq
        stored: list[int] = []
        results: list[tuple[str, bool]] = []
        key_hashes: list[tuple[int, int]] = []
        dues: dict[int, float] = {}
        pending: dict[int, int] = {}
        body_bytes = 0
        for position, key in enumerate(keys):
            hashed = None if key is None else key_hash(name, key)
            if hashed is not None:
                known = pending.get(hashed)
                if known is None:
                    known = self._dedup.find(hashed)
                if known is not None:
                    results.append((format_message_id(*split_key(known)), True))
                    continue
            index = len(stored)
            stored.append(position)
            body_bytes += sizes[position]
            results.append((format_message_id(seq, index), False))
            if hashed is not None:
                pending[hashed] = message_key(seq, index)
                key_hashes.append((index, hashed))
            if delays[position] > 0:
                dues[index] = now + delays[position]

        self._check_limits(queue, len(stored), body_bytes)
        if stored:
            self.next_seq += 1
            queue.reserved_messages += len(stored)
            queue.reserved_bytes += body_bytes
            self._dedup.add(seq, [i for i, _ in key_hashes], [h for _, h in key_hashes], now)
        return PublishPlan(name, seq, now, stored, results, key_hashes, dues, body_bytes)

    def _check_limits(self, queue: Queue, count: int, body_bytes: int) -> None:
        config = queue.config
        messages = queue.live_messages + queue.reserved_messages
        if config.max_messages is not None and count and messages + count > config.max_messages:
            raise QueueFull(
                f"queue {queue.name!r} contains {messages} messages and max_messages is "
                f"{config.max_messages}: {count} more do not fit; retry after consumers ack"
            )
        stored_bytes = queue.live_bytes + queue.reserved_bytes
        if config.max_bytes is not None and count and stored_bytes + body_bytes > config.max_bytes:
            raise QueueFull(
                f"queue {queue.name!r} contains {stored_bytes} body bytes and max_bytes is "
                f"{config.max_bytes}: {body_bytes} more do not fit; retry after consumers ack"
            )

    def commit_publish(self, plan: PublishPlan, batch: Batch) -> None:
        """Make a logged batch visible to consumers."""
        queue = self.queues.get(plan.queue)
        if queue is None:
            # Deleted while the batch was being written; the batch is not kept.
            if self._on_batch_finished is not None:
                self._on_batch_finished(batch)
            return
        queue.reserved_messages -= len(plan.stored)
        queue.reserved_bytes -= plan.body_bytes
        queue.add_batch(batch, plan.dues)

    def abort_publish(self, plan: PublishPlan) -> None:
        """Release what ``prepare_publish`` reserved, after the batch could not be logged."""
        queue = self.queues.get(plan.queue)
        if queue is not None:
            queue.reserved_messages -= len(plan.stored)
            queue.reserved_bytes -= plan.body_bytes
        self._dedup.remove(plan.seq)

    def expire_dedup(self, now: float) -> None:
        self._dedup.expire(now)

    # Leasing and receipts

    def lease(
        self, name: str, max_messages: int, visibility_timeout_s: float | None, now: float
    ) -> tuple[list[LeasedMessage], list[Transfer]]:
        """Lease up to ``max_messages``; also return dead-letter transfers for exhausted ones."""
        queue = self.queue(name)
        timeout = queue.config.visibility_timeout_s if visibility_timeout_s is None else visibility_timeout_s
        outcome = queue.lease(max_messages, timeout, now)
        epoch = self.epoch
        leased = [LeasedMessage(batch, index, batch.deliveries[index], epoch) for batch, index in outcome.leased]
        transfers = self._dead_letter(queue, outcome.exhausted, "max_deliveries")
        return leased, transfers

    def _apply_receipts(
        self, queue: Queue, receipts: Sequence[Any], apply: Callable[[Slot], str | None]
    ) -> ReceiptOutcome:
        """Call ``apply`` for each receipt that matches its message's current delivery, in order.

        ``apply`` changes the message and returns its status, or ``None`` when the
        message is already taken care of in this request (``not_found``).
        """
        outcome = ReceiptOutcome()
        for text, receipt in zip(receipts, parse_receipts(receipts), strict=True):
            if receipt is None:
                outcome.results.append((text, "invalid"))
                continue
            status, slot = queue.check_receipt(receipt, self.epoch)
            if slot is not None:
                applied = apply(slot)
                if applied is None:
                    status = "not_found"
                else:
                    status = applied
                    outcome.keys.append(message_key(slot[0].seq, slot[1]))
            outcome.results.append((text, status))
        return outcome

    def ack(self, name: str, receipts: Sequence[Any]) -> ReceiptOutcome:
        """Ack leased messages, in the order of ``receipts`` (see ``Queue.acknowledge``)."""
        queue = self.queue(name)
        statuses, keys = queue.acknowledge(parse_receipts(receipts), self.epoch)
        return ReceiptOutcome(results=list(zip(receipts, statuses, strict=True)), keys=keys)

    def nack(
        self,
        name: str,
        receipts: Sequence[Any],
        *,
        delay_s: float,
        dead_letter: bool,
        reason: str | None,
        now: float,
    ) -> ReceiptOutcome:
        """Return leased messages to the queue (after ``delay_s``), or dead-letter them.

        Receipts apply in order. A receipt listed twice is dead-lettered once, and
        its repeat finds the message gone (``not_found``). A plain nack listed twice
        applies twice, to the same effect as once.
        """
        queue = self.queue(name)
        if dead_letter and queue.config.dead_letter_queue is None:
            raise InvalidRequest(
                f"dead_letter=true is invalid for queue {name!r}: it has no dead-letter "
                "queue; set dead_letter_queue with PUT /v1/queues/{name} first"
            )
        if dead_letter:
            chosen: list[Slot] = []
            chosen_keys: set[int] = set()

            def choose(slot: Slot) -> str | None:
                key = message_key(slot[0].seq, slot[1])
                if key in chosen_keys:
                    return None
                chosen_keys.add(key)
                chosen.append(slot)
                return "dead_lettered"

            outcome = self._apply_receipts(queue, receipts, choose)
            outcome.transfers = self._dead_letter(queue, chosen, reason)
            return outcome

        def give_back(slot: Slot) -> str:
            if delay_s > 0:
                queue.defer(slot, now + delay_s)
            else:
                queue.apply(slot[0], slot[1], Transition.NACK)
            return "nacked"

        return self._apply_receipts(queue, receipts, give_back)

    def extend(self, name: str, receipts: Sequence[Any], visibility_timeout_s: float, now: float) -> ReceiptOutcome:
        queue = self.queue(name)

        def renew(slot: Slot) -> str:
            queue.extend(slot, visibility_timeout_s, now)
            return "extended"

        return self._apply_receipts(queue, receipts, renew)

    # Moving messages between queues

    def _dead_letter(self, queue: Queue, slots: list[Slot], reason: str | None) -> list[Transfer]:
        if not slots:
            return []
        target = queue.config.dead_letter_queue
        if target is None or target not in self.queues:
            # Without a dead-letter queue the messages stay; make them ready again.
            for batch, index in slots:
                queue.apply(batch, index, Transition.NACK)
            return []
        origins = []
        for batch, index in slots:
            origins.append(
                DeadLetterOrigin(
                    queue.name,
                    format_message_id(batch.seq, index),
                    batch.deliveries[index],
                    reason,
                )
            )
            queue.apply(batch, index, Transition.MOVE)
        queue.totals.dead_lettered += len(slots)
        return [Transfer(queue.name, target, self.allocate_seq(), slots, origins, "dead_letter")]

    def redrive(self, name: str, max_messages: int | None) -> list[Transfer]:
        """Move READY messages of dead-letter queue ``name`` back to their source queues.

        Messages whose source queue no longer exists, or that were published to
        ``name`` directly, stay where they are.
        """
        queue = self.queue(name)
        limit = queue.live_messages if max_messages is None else max_messages
        by_target: dict[str, list[Slot]] = {}
        chosen = 0
        for batch, index in queue.ready_slots(queue.live_messages):
            if chosen >= limit:
                break
            if batch.origins is None:
                continue
            source = batch.origins[index].queue
            if source not in self.queues or source == name:
                continue
            by_target.setdefault(source, []).append((batch, index))
            chosen += 1

        transfers = []
        for target, slots in by_target.items():
            for batch, index in slots:
                queue.apply(batch, index, Transition.MOVE)
            transfers.append(Transfer(name, target, self.allocate_seq(), slots, None, "redrive"))
        return transfers

    def commit_transfer(self, transfer: Transfer, batch: Batch) -> None:
        """Add the logged copy of a transfer's messages to its target queue."""
        target = self.queues.get(transfer.target)
        if target is None:
            if self._on_batch_finished is not None:
                self._on_batch_finished(batch)
            return
        target.add_batch(batch)

    # Time

    def tick(self, now: float) -> list[Transfer]:
        """Expire leases, release due delays and forget old dedup keys up to ``now``.

        Returns dead-letter transfers for messages whose last delivery expired.
        """
        self.expire_dedup(now)
        transfers: list[Transfer] = []
        for queue in list(self.queues.values()):
            exhausted = queue.expire(now)
            transfers.extend(self._dead_letter(queue, exhausted, "max_deliveries"))
        return transfers

    def apply_retention(self, now: float) -> int:
        """Drop messages older than their queue's retention_s; return how many."""
        return sum(
            queue.drop_older_than(now - queue.config.retention_s)
            for queue in list(self.queues.values())
        )

    # Replay of logged changes

    def replay_keys(self, name: str, keys: Sequence[int], transition: Transition, due: float | None = None) -> None:
        """Apply a logged ack, nack or move to messages that still exist; skip the rest."""
        queue = self.queues.get(name)
        if queue is None:
            return
        for key in keys:
            slot = queue.slot(*split_key(key))
            if slot is None or slot[0].states[slot[1]] not in LIVE_CODES:
                continue
            if transition is Transition.DEFER and due is not None:
                queue.defer(slot, due)
            else:
                queue.apply(slot[0], slot[1], transition)
                if transition is Transition.ACK:
                    queue.totals.acked += 1

    def replay_transfer(self, source: str, keys: Sequence[int], kind: str) -> None:
        """Apply the source side of a logged dead-letter or redrive."""
        self.replay_keys(source, keys, Transition.MOVE)
        queue = self.queues.get(source)
        if queue is not None and kind == "dead_letter":
            queue.totals.dead_lettered += len(keys)

    def replay_leases(self, name: str, keys: Sequence[int]) -> None:
        """Count logged deliveries; the leases themselves do not survive a restart."""
        queue = self.queues.get(name)
        if queue is None:
            return
        for key in keys:
            slot = queue.slot(*split_key(key))
            if slot is not None and slot[0].states[slot[1]] == READY:
                slot[0].deliveries[slot[1]] += 1

    def replay_publish(
        self,
        name: str,
        batch: Batch,
        key_indexes: Sequence[int],
        key_hashes: Sequence[int],
        dues: dict[int, float],
        now: float,
    ) -> None:
        """Add a logged batch; its dedup keys count only while inside the window."""
        self.next_seq = max(self.next_seq, batch.seq + 1)
        if batch.published_at + self.dedup_window_s > now:
            self._dedup.add(batch.seq, key_indexes, key_hashes, batch.published_at)
        queue = self.queues.get(name)
        if queue is None:
            if self._on_batch_finished is not None:
                self._on_batch_finished(batch)
            return
        live_dues = {index: due for index, due in dues.items() if due > now}
        queue.add_batch(batch, live_dues)

    # Checkpoints

    def checkpoint(self) -> dict[str, Any]:
        """Return what a new log segment starts with: configs, totals and counters.

        Dedup keys are not part of it: segments are kept until their publish
        records are older than the dedup window, and replay reads the keys there.
        """
        return {
            "epoch": self.epoch,
            "next_seq": self.next_seq,
            "queues": {
                name: {"config": queue.config.to_json(), "totals": _totals_json(queue)}
                for name, queue in self.queues.items()
            },
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Load a checkpoint into an empty broker (the first segment's, at start)."""
        self.epoch = max(self.epoch, int(checkpoint["epoch"]))
        self.next_seq = max(self.next_seq, int(checkpoint["next_seq"]))
        for name, entry in checkpoint["queues"].items():
            queue = self._new_queue(name, QueueConfig.from_json(entry["config"]))
            totals = entry["totals"]
            queue.totals.published = totals["published"]
            queue.totals.acked = totals["acked"]
            queue.totals.redelivered = totals["redelivered"]
            queue.totals.dead_lettered = totals["dead_lettered"]
            self.queues[name] = queue


def _totals_json(queue: Queue) -> dict[str, int]:
    totals = queue.totals
    return {
        "published": totals.published,
        "acked": totals.acked,
        "redelivered": totals.redelivered,
        "dead_lettered": totals.dead_lettered,
    }


def _default_dead_letter_name(name: str) -> str | None:
    """Return ``{name}.dlq``, or ``None`` for a dead-letter queue or a name too long for the suffix."""
    if name.endswith(DEAD_LETTER_SUFFIX):
        return None
    candidate = name + DEAD_LETTER_SUFFIX
    return candidate if len(candidate) <= 128 else None
