"""State of one queue: ready order, in-flight leases, delays and counts."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from queue_server.core.batch import INDEX_BITS, Batch, message_key, split_key
from queue_server.core.config import QueueConfig
from queue_server.core.receipts import Receipt
from queue_server.core.states import (
    ACKED,
    DELAYED,
    LEASED,
    LIVE_CODES,
    READY,
    STATES,
    TABLE,
    Transition,
)
from queue_server.errors import IllegalTransition

#: A message handed to ``Queue`` methods and back: its batch and index in the batch.
Slot = tuple[Batch, int]


@dataclass(slots=True)
class Totals:
    """Counters since the queue was created; kept across restarts through the log."""

    published: int = 0
    acked: int = 0
    redelivered: int = 0
    dead_lettered: int = 0


@dataclass(slots=True)
class LeaseOutcome:
    """Result of ``Queue.lease``: messages now leased, and messages to dead-letter instead."""

    leased: list[Slot] = field(default_factory=list)
    exhausted: list[Slot] = field(default_factory=list)


class Queue:
    """One queue's messages and their lease state.

    Every READY message is either at or past its batch's ``next_fresh`` index
    (found by scanning ``fresh`` in publish order) or in ``retry`` (messages that
    became ready again). Entries in ``retry`` and the heaps are checked when
    taken, because a message may have moved on since they were added.
    """

    def __init__(
        self,
        name: str,
        config: QueueConfig,
        *,
        on_batch_finished: Callable[[Batch], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.totals = Totals()
        self.batches: dict[int, Batch] = {}
        self.counts = [0] * len(STATES)
        self.live_bytes = 0
        self.reserved_messages = 0
        self.reserved_bytes = 0
        self._fresh: deque[Batch] = deque()
        self._retry: deque[int] = deque()
        self._in_flight: dict[int, float] = {}
        self._expiries: list[tuple[float, int, list[int]]] = []
        self._delays: dict[int, float] = {}
        self._due: list[tuple[float, int]] = []
        self._tiebreak = itertools.count()
        self._on_batch_finished = on_batch_finished

    # Counts

    @property
    def ready(self) -> int:
        return self.counts[READY]

    @property
    def leased(self) -> int:
        return self.counts[LEASED]

    @property
    def delayed(self) -> int:
        return self.counts[DELAYED]

    @property
    def live_messages(self) -> int:
        return self.counts[READY] + self.counts[LEASED] + self.counts[DELAYED]

    def oldest_ready_published_at(self) -> float | None:
        """Return the publish time of the oldest READY message, or ``None`` when none is."""
        oldest: float | None = None
        for batch in self.batches.values():
            if batch.states.find(READY) >= 0:
                oldest = batch.published_at
                break
        for key in self._retry:
            retried = self._batch_of(key)
            if retried is not None and retried.states[split_key(key)[1]] == READY:
                if oldest is None or retried.published_at < oldest:
                    oldest = retried.published_at
        return oldest

    # Batches

    def add_batch(self, batch: Batch, dues: dict[int, float] | None = None) -> None:
        """Register a committed batch; ``dues`` maps indexes of delayed messages to due times."""
        self.batches[batch.seq] = batch
        delayed = len(dues) if dues else 0
        self.counts[READY] += batch.count - delayed
        self.counts[DELAYED] += delayed
        self.live_bytes += batch.body_bytes
        self.totals.published += batch.count
        for index, due in (dues or {}).items():
            key = message_key(batch.seq, index)
            self._delays[key] = due
            heapq.heappush(self._due, (due, key))
        self._fresh.append(batch)

    def slot(self, seq: int, index: int) -> Slot | None:
        batch = self.batches.get(seq)
        if batch is None or not 0 <= index < batch.count:
            return None
        return batch, index

    def _batch_of(self, key: int) -> Batch | None:
        return self.batches.get(key >> 20)

    def apply(self, batch: Batch, index: int, transition: Transition) -> int:
        """Move one message along ``transition`` and keep every count in step; return the new code."""
        old = batch.states[index]
        new = TABLE[transition][old]
        if new < 0:
            raise IllegalTransition(
                f"transition {transition.value!r} is not allowed from state "
                f"{STATES[old].value!r} (message {batch.seq}-{index} in queue {self.name!r})"
            )
        batch.states[index] = new
        self.counts[old] -= 1
        self.counts[new] += 1
        key = message_key(batch.seq, index)
        if old == LEASED and new != LEASED:
            self._in_flight.pop(key, None)
        if old == DELAYED and new != DELAYED:
            self._delays.pop(key, None)
        if new == READY and old != READY and index < batch.next_fresh:
            self._retry.append(key)
        if new not in LIVE_CODES:
            self.live_bytes -= batch.size(index)
            batch.live -= 1
            if batch.live == 0:
                self._finish(batch)
        return new

    def _finish(self, batch: Batch) -> None:
        del self.batches[batch.seq]
        if self._on_batch_finished is not None:
            self._on_batch_finished(batch)

    def drop_all(self) -> None:
        """Drop every live message, as when the queue is deleted."""
        for batch in list(self.batches.values()):
            self._drop_batch(batch)

    def drop_older_than(self, cutoff: float) -> int:
        """Drop live messages published before ``cutoff`` (retention); return how many."""
        dropped = 0
        for batch in list(self.batches.values()):
            if batch.published_at < cutoff:
                dropped += self._drop_batch(batch)
        return dropped

    def _drop_batch(self, batch: Batch) -> int:
        dropped = 0
        for index in range(batch.count):
            if batch.states[index] in LIVE_CODES:
                self.apply(batch, index, Transition.DROP)
                dropped += 1
        return dropped

    # Leasing

    def lease(self, max_messages: int, visibility_timeout_s: float, now: float) -> LeaseOutcome:
        """Lease up to ``max_messages`` READY messages, redelivered ones first.

        A message already delivered ``max_deliveries`` times goes to
        ``exhausted`` instead when the queue has a dead-letter queue.
        """
        outcome = LeaseOutcome()
        ready = self._take_ready(max_messages)
        if self.config.dead_letter_queue is None:
            outcome.leased = ready
        else:
            for batch, index in ready:
                if self._exhausted(batch, index):
                    outcome.exhausted.append((batch, index))
                else:
                    outcome.leased.append((batch, index))

        # Every slot is READY (checked by _take_ready), so the LEASE transition is
        # applied here directly, with the counts moved once for all of them.
        expires_at = now + visibility_timeout_s
        keys = []
        in_flight = self._in_flight
        redelivered = 0
        for batch, index in outcome.leased:
            batch.states[index] = LEASED
            deliveries = batch.deliveries[index] + 1
            batch.deliveries[index] = deliveries
            if deliveries > 1:
                redelivered += 1
            key = (batch.seq << INDEX_BITS) | index
            in_flight[key] = expires_at
            keys.append(key)
        self.counts[READY] -= len(keys)
        self.counts[LEASED] += len(keys)
        self.totals.redelivered += redelivered
        if keys:
            heapq.heappush(self._expiries, (expires_at, next(self._tiebreak), keys))
        return outcome

    def _take_ready(self, limit: int) -> list[Slot]:
        taken: list[Slot] = []
        # A message can be listed in the retry order twice: made ready, delayed,
        # then ready again before it was leased. It is taken once.
        retried: set[int] = set()
        while self._retry and len(taken) < limit:
            key = self._retry.popleft()
            batch = self._batch_of(key)
            index = key & 0xFFFFF
            if batch is not None and batch.states[index] == READY and index < batch.next_fresh and key not in retried:
                retried.add(key)
                taken.append((batch, index))
        while self._fresh and len(taken) < limit:
            batch = self._fresh[0]
            index = batch.next_fresh
            states = batch.states
            count = len(states)
            while index < count and len(taken) < limit:
                end = min(count, index + limit - len(taken))
                taken.extend([(batch, i) for i in range(index, end) if states[i] == READY])
                index = end
            batch.next_fresh = index
            if index >= count:
                self._fresh.popleft()
        # Every returned slot has left the ready structures, so the caller must lease
        # or dead-letter each one.
        return taken

    def _exhausted(self, batch: Batch, index: int) -> bool:
        return (
            self.config.dead_letter_queue is not None
            and batch.deliveries[index] >= self.config.max_deliveries
        )

    def check_receipt(self, receipt: Receipt, epoch: int) -> tuple[str, Slot | None]:
        """Match a receipt against the message's current delivery.

        Returns ``("ok", slot)``, ``("stale", None)`` when the message was leased
        again since (or before the server restarted), or ``("not_found", None)``
        when the message is gone.
        """
        seq, index, deliveries, receipt_epoch = receipt
        batch = self.batches.get(seq)
        if batch is None or index >= len(batch.states) or batch.states[index] not in LIVE_CODES:
            return "not_found", None
        if receipt_epoch != epoch or deliveries != batch.deliveries[index]:
            return "stale", None
        return "ok", (batch, index)

    def acknowledge(self, receipts: Sequence[Receipt | None], epoch: int) -> tuple[list[str], list[int]]:
        """Ack each message whose receipt matches its current delivery, in order.

        Returns a status per receipt (``acked``, ``stale``, ``not_found``, or
        ``invalid`` for ``None``) and the keys of the messages acked. The result
        equals ``check_receipt`` and then ``apply(ACK)`` per receipt, in one loop,
        because a consumer acks thousands of messages at a time. A receipt listed
        twice is acked once; its repeat finds the message gone (``not_found``).
        """
        statuses: list[str] = []
        keys: list[int] = []
        batches = self.batches
        counts = self.counts
        in_flight = self._in_flight
        freed_bytes = 0
        for receipt in receipts:
            if receipt is None:
                statuses.append("invalid")
                continue
            seq, index, deliveries, receipt_epoch = receipt
            batch = batches.get(seq)
            if batch is None or index >= len(batch.states) or batch.states[index] not in LIVE_CODES:
                statuses.append("not_found")
                continue
            if receipt_epoch != epoch or deliveries != batch.deliveries[index]:
                statuses.append("stale")
                continue
            old = batch.states[index]
            batch.states[index] = ACKED
            counts[old] -= 1
            key = (seq << INDEX_BITS) | index
            if old == LEASED:
                in_flight.pop(key, None)
            elif old == DELAYED:
                self._delays.pop(key, None)
            offsets = batch.offsets
            freed_bytes += offsets[index + 1] - offsets[index]
            batch.live -= 1
            if batch.live == 0:
                self._finish(batch)
            statuses.append("acked")
            keys.append(key)
        counts[ACKED] += len(keys)
        self.live_bytes -= freed_bytes
        self.totals.acked += len(keys)
        return statuses, keys

    def extend(self, slot: Slot, visibility_timeout_s: float, now: float) -> None:
        batch, index = slot
        self.apply(batch, index, Transition.EXTEND)
        key = message_key(batch.seq, index)
        expires_at = now + visibility_timeout_s
        self._in_flight[key] = expires_at
        heapq.heappush(self._expiries, (expires_at, next(self._tiebreak), [key]))

    def defer(self, slot: Slot, due: float) -> None:
        """Make a message DELAYED until ``due`` (a nack with a delay, or a delayed publish)."""
        batch, index = slot
        self.apply(batch, index, Transition.DEFER)
        key = message_key(batch.seq, index)
        self._delays[key] = due
        heapq.heappush(self._due, (due, key))

    # Time

    def expire(self, now: float) -> list[Slot]:
        """Apply lease expiry and due delays up to ``now``; return exhausted messages.

        An expired message that reached ``max_deliveries`` stays LEASED and is
        returned, so the caller can dead-letter it; every other one becomes READY.
        """
        exhausted: list[Slot] = []
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, _, keys = heapq.heappop(self._expiries)
            for key in keys:
                if self._in_flight.get(key) != expires_at:
                    continue
                batch = self._batch_of(key)
                if batch is None:
                    continue
                index = key & 0xFFFFF
                if self._exhausted(batch, index):
                    del self._in_flight[key]
                    exhausted.append((batch, index))
                else:
                    self.apply(batch, index, Transition.EXPIRE)
        while self._due and self._due[0][0] <= now:
            due, key = heapq.heappop(self._due)
            if self._delays.get(key) != due:
                continue
            batch = self._batch_of(key)
            if batch is not None:
                self.apply(batch, key & 0xFFFFF, Transition.DUE)
        return exhausted

    def ready_slots(self, limit: int) -> Iterable[Slot]:
        """Yield up to ``limit`` READY messages without changing them (for redrive)."""
        found = 0
        for batch in list(self.batches.values()):
            for index in range(batch.count):
                if found >= limit:
                    return
                if batch.states[index] == READY:
                    found += 1
                    yield batch, index
