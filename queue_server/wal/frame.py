"""Framing of log records: length, CRC32C of the payload, CRC32C of the header.

A frame is a 12-byte header (payload length, payload CRC32C, CRC32C of those
8 bytes; little-endian) followed by the payload. The header checksum
distinguishes a damaged length field from a record whose write was cut short.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import google_crc32c

from queue_server.errors import CorruptLog

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
_PREFIX = struct.Struct("<II")


def encode_frame(payload: bytes) -> bytes:
    prefix = _PREFIX.pack(len(payload), google_crc32c.value(payload))
    return prefix + struct.pack("<I", google_crc32c.value(prefix)) + payload


@dataclass(frozen=True, slots=True)
class ScanResult:
    """Frames found in one segment: ``(offset, payload)`` pairs and where valid data ends.

    ``torn`` is True when bytes after ``end`` are the remains of a write that was
    cut short; recovery truncates the file there.
    """

    frames: list[tuple[int, memoryview]]
    end: int
    torn: bool


def scan_frames(data: bytes | bytearray | memoryview, *, path: str, final: bool) -> ScanResult:
    """Read every frame of a segment.

    In the ``final`` segment an incomplete last frame (short header, a length
    past the end of the file, a bad payload checksum on the very last frame, or
    a zero-filled tail) is a torn write. Anything else that fails to verify
    raises ``CorruptLog`` naming ``path`` and the byte offset.
    """
    view = memoryview(data)
    size = len(view)
    frames: list[tuple[int, memoryview]] = []
    offset = 0
    while offset < size:
        remaining = size - offset
        if remaining < HEADER_SIZE:
            return _torn_or_corrupt(frames, offset, path, final, "incomplete record header")
        length, payload_crc, header_crc = HEADER.unpack_from(view, offset)
        if google_crc32c.value(bytes(view[offset : offset + 8])) != header_crc:
            if final and not any(view[offset:]):
                return ScanResult(frames, offset, torn=True)
            raise CorruptLog(path, offset, "record header checksum mismatch")
        start = offset + HEADER_SIZE
        end = start + length
        if end > size:
            return _torn_or_corrupt(frames, offset, path, final, "record extends past the end of the file")
        payload = view[start:end]
        # google_crc32c accepts bytes but not memoryview, hence the copy.
        if google_crc32c.value(bytes(payload)) != payload_crc:
            if final and end == size:
                return ScanResult(frames, offset, torn=True)
            raise CorruptLog(path, offset, "record payload checksum mismatch")
        frames.append((start, payload))
        offset = end
    return ScanResult(frames, offset, torn=False)


def _torn_or_corrupt(
    frames: list[tuple[int, memoryview]], offset: int, path: str, final: bool, reason: str
) -> ScanResult:
    if final:
        return ScanResult(frames, offset, torn=True)
    raise CorruptLog(path, offset, reason)
