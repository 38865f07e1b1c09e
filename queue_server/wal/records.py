"""Encoding of the log's record types.

Every payload starts with a one-byte ``RecordType``. A publish record is
binary so that bodies stay raw JSON bytes. It contains a length-prefixed JSON
header, the message count and key count (uint32), and the ``count + 1`` body
offsets (uint32). Then come the indexes (uint32) and key hashes (uint64) of the
messages that carry an idempotency key, and the bodies back to back. Integers
are little-endian. The other records are small JSON objects.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson

_U32 = struct.Struct("<I")


class RecordType(IntEnum):
    CHECKPOINT = 1
    PUBLISH = 2
    ACK = 3
    NACK = 4
    LEASE = 5
    QUEUE_PUT = 6
    QUEUE_DELETE = 7
    #: Push subscriptions; replayed by the extension registered for them.
    SUBSCRIPTION_PUT = 8
    SUBSCRIPTION_DELETE = 9


@dataclass(slots=True)
class PublishHeader:
    """The header of a publish record; everything but ``key_hashes`` is stored as JSON.

    ``moved`` is set when the batch is a copy made by dead-lettering or redrive:
    ``{"from": source queue, "keys": [message keys], "kind": "dead_letter" | "redrive"}``.
    """

    queue: str
    seq: int
    published_at: float
    key_hashes: list[tuple[int, int]]
    dues: dict[int, float]
    origins: list[dict[str, Any]] | None = None
    moved: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"q": self.queue, "seq": self.seq, "t": self.published_at}
        if self.dues:
            data["dues"] = [[index, due] for index, due in self.dues.items()]
        if self.origins is not None:
            data["origins"] = self.origins
        if self.moved is not None:
            data["moved"] = self.moved
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PublishHeader":
        return cls(
            queue=data["q"],
            seq=data["seq"],
            published_at=data["t"],
            key_hashes=[],
            dues={index: due for index, due in data.get("dues", ())},
            origins=data.get("origins"),
            moved=data.get("moved"),
        )


def _little_endian(table: array[int]) -> bytes:
    if sys.byteorder == "little":
        return table.tobytes()
    swapped = array(table.typecode, table)
    swapped.byteswap()
    return swapped.tobytes()


def _read_table(payload: memoryview, typecode: str, start: int, count: int) -> tuple[array[int], int]:
    table = array(typecode)
    end = start + table.itemsize * count
    table.frombytes(payload[start:end])
    if sys.byteorder != "little":
        table.byteswap()
    return table, end


def encode_publish(header: PublishHeader, bodies: list[bytes]) -> tuple[bytes, array[int], int]:
    """Return the payload, the body offsets and where the body section starts in the payload."""
    meta = orjson.dumps(header.to_json())
    offsets = array("I", [0])
    position = 0
    for body in bodies:
        position += len(body)
        offsets.append(position)
    key_indexes = array("I", [index for index, _ in header.key_hashes])
    key_hashes = array("Q", [hashed for _, hashed in header.key_hashes])
    prefix = b"".join(
        [
            bytes([RecordType.PUBLISH]),
            _U32.pack(len(meta)),
            meta,
            _U32.pack(len(bodies)),
            _U32.pack(len(key_indexes)),
            _little_endian(offsets),
            _little_endian(key_indexes),
            _little_endian(key_hashes),
        ]
    )
    return b"".join([prefix, *bodies]), offsets, len(prefix)


@dataclass(slots=True)
class DecodedPublish:
    header: PublishHeader
    offsets: array[int]
    #: Offset of the body section inside the payload.
    body_start: int
    #: Messages with an idempotency key: ``key_hashes[i]`` belongs to message ``key_indexes[i]``.
    key_indexes: array[int]
    key_hashes: array[int]


def decode_publish(payload: memoryview) -> DecodedPublish:
    """Decode a publish record without touching its bodies."""
    (meta_length,) = _U32.unpack_from(payload, 1)
    meta_end = 5 + meta_length
    header = PublishHeader.from_json(orjson.loads(payload[5:meta_end]))
    count, key_count = struct.unpack_from("<II", payload, meta_end)
    offsets, position = _read_table(payload, "I", meta_end + 8, count + 1)
    key_indexes, position = _read_table(payload, "I", position, key_count)
    key_hashes, body_start = _read_table(payload, "Q", position, key_count)
    if offsets[-1] != len(payload) - body_start:
        raise ValueError(
            f"publish record of batch {header.seq} has bodies of {len(payload) - body_start} bytes, "
            f"but its offsets end at {offsets[-1]}"
        )
    return DecodedPublish(header, offsets, body_start, key_indexes, key_hashes)


def encode_json(kind: RecordType, data: dict[str, Any]) -> bytes:
    return bytes([kind]) + orjson.dumps(data)


def decode_json(payload: memoryview) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(payload[1:])
    return data


def record_type(payload: memoryview) -> RecordType:
    return RecordType(payload[0])
