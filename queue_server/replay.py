"""Rebuilding the broker's state from the write-ahead log at start."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from queue_server.core.batch import Batch, DeadLetterOrigin
from queue_server.core.broker import Broker
from queue_server.core.states import Transition
from queue_server.errors import CorruptLog, StorageError
from queue_server.wal.log import Position
from queue_server.wal.records import RecordType, decode_json, decode_publish, record_type

logger = logging.getLogger(__name__)


#: Replays one JSON record of a type that an extension (such as push subscriptions) owns.
RecordHandler = Callable[[dict[str, Any]], None]


def replay(
    broker: Broker,
    records: Iterable[tuple[Position, memoryview]],
    now: float,
    segment_batches: Counter[int],
    *,
    handlers: Mapping[RecordType, RecordHandler] | None = None,
    restore_extensions: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Apply logged records to an empty broker; return how many were read.

    ``segment_batches`` counts the live batches of each segment, for deleting
    segments whose batches are all finished. ``handlers`` replay record types
    that extensions own, and ``restore_extensions`` receives the ``extensions``
    entry of the first checkpoint.
    """
    handlers = handlers or {}
    count = 0
    restored = False
    for position, payload in records:
        count += 1
        try:
            kind = record_type(payload)
        except ValueError as exc:
            raise CorruptLog(f"segment {position.segment}", position.offset, f"unknown record type {payload[0]}") from exc
        if kind is RecordType.CHECKPOINT:
            data = decode_json(payload)
            if not restored:
                broker.restore(data)
                if restore_extensions is not None:
                    restore_extensions(data.get("extensions", {}))
                restored = True
            else:
                broker.epoch = max(broker.epoch, int(data["epoch"]))
                broker.next_seq = max(broker.next_seq, int(data["next_seq"]))
        elif kind is RecordType.PUBLISH:
            _replay_publish(broker, position, payload, now, segment_batches)
        elif kind is RecordType.ACK:
            data = decode_json(payload)
            broker.replay_keys(data["q"], data["k"], Transition.ACK)
        elif kind is RecordType.NACK:
            data = decode_json(payload)
            due = data.get("due")
            if due is not None and due > now:
                broker.replay_keys(data["q"], data["k"], Transition.DEFER, due)
            else:
                broker.replay_keys(data["q"], data["k"], Transition.NACK)
        elif kind is RecordType.LEASE:
            data = decode_json(payload)
            broker.replay_leases(data["q"], data["k"])
        elif kind is RecordType.QUEUE_PUT:
            data = decode_json(payload)
            broker.put_queue(data["name"], data["config"])
        elif kind is RecordType.QUEUE_DELETE:
            data = decode_json(payload)
            if data["name"] in broker.queues:
                broker.delete_queue(data["name"])
        elif kind in handlers:
            handlers[kind](decode_json(payload))
        else:
            raise StorageError(
                f"record type {kind.name} at offset {position.offset} of segment {position.segment} "
                "has no replay rule: the extension that wrote it is not registered"
            )
    return count


def _replay_publish(
    broker: Broker, position: Position, payload: memoryview, now: float, segment_batches: Counter[int]
) -> None:
    decoded = decode_publish(payload)
    header = decoded.header
    if header.moved is not None:
        broker.replay_transfer(header.moved["from"], header.moved["keys"], header.moved["kind"])
    live_dues = {index: due for index, due in header.dues.items() if due > now}
    origins = None
    if header.origins is not None:
        origins = [DeadLetterOrigin.from_json(item) for item in header.origins]
    batch = Batch(
        header.seq,
        header.published_at,
        decoded.offsets,
        Position(position.segment, position.offset + decoded.body_start),
        delayed=frozenset(live_dues),
        origins=origins,
    )
    segment_batches[position.segment] += 1
    broker.replay_publish(header.queue, batch, decoded.key_indexes, decoded.key_hashes, live_dues, now)
