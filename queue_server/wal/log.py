"""Segment files, group commit and recovery of the write-ahead log.

Records are appended with ``os.write`` on the event loop (into the page cache)
and made durable by ``fdatasync`` on a dedicated thread. With the ``always``
policy, every writer that waits for durability while a sync runs joins the next
one, so concurrent requests share a single ``fdatasync``.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from queue_server.errors import DataDirLocked, StorageError
from queue_server.wal.frame import encode_frame, scan_frames

logger = logging.getLogger(__name__)

SEGMENT_PATTERN = re.compile(r"(\d{10})\.wal")
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024


class FsyncPolicy(str, Enum):
    """When appended records reach stable storage.

    ``always``: a write is acknowledged only after an fdatasync that covers it.
    ``interval``: fdatasync runs every interval; a crash of the machine (not just
    the process) can lose the writes of the last interval.
    ``never``: the operating system decides; a machine crash can lose any write
    that it had not flushed yet.
    """

    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class Position:
    """Location of a record's payload: segment number and byte offset in that segment."""

    segment: int
    offset: int


@dataclass(slots=True)
class _Segment:
    number: int
    path: Path
    fd: int
    size: int
    #: Wall-clock time of the last write, set when the segment stops being the current one.
    closed_at: float | None = None


def segment_name(number: int) -> str:
    return f"{number:010d}.wal"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir():
        match = SEGMENT_PATTERN.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


class WriteAheadLog:
    """Appends, syncs, reads and deletes segments in one data directory.

    ``open`` takes an exclusive ``flock`` on ``LOCK`` in the directory, so a
    second server on the same directory fails to start instead of interleaving
    writes. ``sync_listener`` receives the duration of every fdatasync in seconds.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: FsyncPolicy = FsyncPolicy.ALWAYS,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        sync_listener: Callable[[float], None] | None = None,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self._sync_listener = sync_listener
        self._segments: dict[int, _Segment] = {}
        self._current: _Segment | None = None
        self._lock_fd: int | None = None
        self._written = 0
        self._synced = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sync_task: asyncio.Task[None] | None = None
        self._syncing_fd: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-sync")
        self._failed: str | None = None

    # Opening and recovery

    def lock(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise DataDirLocked(
                f"data directory {str(self.directory)!r} is locked by another queue server; "
                "stop that server or choose another QUEUE_DATA_DIR"
            ) from exc
        self._lock_fd = fd

    def recover(self) -> Iterator[tuple[Position, memoryview]]:
        """Yield every record payload in log order, truncating a torn tail first.

        Raises ``CorruptLog`` for damage anywhere but the tail of the last segment.
        """
        found = list_segments(self.directory)
        for position, (number, path) in enumerate(found):
            final = position == len(found) - 1
            fd = os.open(path, os.O_RDWR)
            data = _read_all(fd)
            result = scan_frames(data, path=str(path), final=final)
            if result.torn:
                logger.warning(
                    "truncating torn tail of %s at byte %d (%d bytes after the last whole record)",
                    path,
                    result.end,
                    len(data) - result.end,
                )
                os.ftruncate(fd, result.end)
                os.fsync(fd)
            segment = _Segment(number, path, fd, result.end, closed_at=os.fstat(fd).st_mtime)
            self._segments[number] = segment
            for offset, payload in result.frames:
                yield Position(number, offset), payload
            del data, result

    def start_segment(self, first_payload: bytes) -> None:
        """Open a new segment for appending that begins with ``first_payload`` (a checkpoint)."""
        previous = self._current
        number = max(self._segments, default=0) + 1
        path = self.directory / segment_name(number)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        if previous is not None:
            os.fsync(previous.fd)
            previous.closed_at = time.time()
        segment = _Segment(number, path, fd, 0)
        self._segments[number] = segment
        self._current = segment
        self._write(encode_frame(first_payload))
        os.fsync(fd)
        _fsync_directory(self.directory)
        self._synced = self._written
        logger.debug("started log segment %s", path)

    # Writing

    @property
    def current_segment(self) -> int:
        if self._current is None:
            raise StorageError("the write-ahead log has no open segment")
        return self._current.number

    @property
    def end_position(self) -> int:
        """Bytes appended since the log was opened; ``wait_durable`` takes such a position."""
        return self._written

    @property
    def written_bytes(self) -> int:
        """Bytes in all segment files."""
        return sum(segment.size for segment in self._segments.values())

    def needs_new_segment(self) -> bool:
        return self._current is not None and self._current.size >= self.segment_bytes

    def append(self, payload: bytes) -> tuple[Position, int]:
        """Write one record; return where its payload starts and the log position to wait for."""
        if self._current is None:
            raise StorageError("the write-ahead log has no open segment")
        frame = encode_frame(payload)
        start = self._current.size
        self._write(frame)
        return Position(self._current.number, start + 12), self._written

    def _write(self, frame: bytes) -> None:
        if self._failed is not None:
            raise StorageError(f"the write-ahead log stopped accepting writes after: {self._failed}")
        segment = self._current
        assert segment is not None
        try:
            view = memoryview(frame)
            while view:
                done = os.write(segment.fd, view)
                view = view[done:]
        except OSError as exc:
            self._undo_partial_write(segment, exc)
            raise StorageError(f"writing to {str(segment.path)!r} failed: {exc}") from exc
        segment.size += len(frame)
        self._written += len(frame)

    def _undo_partial_write(self, segment: _Segment, error: OSError) -> None:
        try:
            os.ftruncate(segment.fd, segment.size)
        except OSError as exc:
            self._failed = f"{error}; truncating {str(segment.path)!r} failed too: {exc}"

    async def wait_durable(self, position: int) -> None:
        """Return once the log up to ``position`` is durable under the fsync policy."""
        if self.fsync is not FsyncPolicy.ALWAYS or position <= self._synced:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((position, future))
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())
        await future

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiters:
            try:
                await self.sync(loop)
            except StorageError as exc:
                waiters, self._waiters = self._waiters, []
                for _, future in waiters:
                    if not future.done():
                        future.set_exception(exc)
                return
            ready = [(p, f) for p, f in self._waiters if p <= self._synced]
            self._waiters = [(p, f) for p, f in self._waiters if p > self._synced]
            for _, future in ready:
                if not future.done():
                    future.set_result(None)

    async def sync(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """fdatasync the current segment on the sync thread."""
        if self._current is None or self._synced >= self._written:
            return
        loop = loop or asyncio.get_running_loop()
        target = self._written
        fd = self._current.fd
        started = time.perf_counter()
        self._syncing_fd = fd
        try:
            await loop.run_in_executor(self._executor, os.fdatasync, fd)
        except OSError as exc:
            self._failed = f"fdatasync failed: {exc}"
            raise StorageError(f"fdatasync of the write-ahead log failed: {exc}") from exc
        finally:
            self._syncing_fd = None
        self._synced = max(self._synced, target)
        if self._sync_listener is not None:
            self._sync_listener(time.perf_counter() - started)

    # Reading and deleting

    def read(self, position: Position, start: int, end: int) -> bytes:
        """Read payload bytes ``start:end`` of the record at ``position``."""
        segment = self._segments.get(position.segment)
        if segment is None:
            raise StorageError(f"log segment {position.segment} was deleted while still in use")
        length = end - start
        data = os.pread(segment.fd, length, position.offset + start)
        if len(data) != length:
            raise StorageError(
                f"short read from {str(segment.path)!r} at {position.offset + start}: "
                f"{len(data)} of {length} bytes"
            )
        return data

    def closed_segments(self) -> list[tuple[int, float]]:
        """Return ``(number, closed_at)`` of every segment but the current one, oldest first."""
        return sorted(
            (segment.number, segment.closed_at)
            for segment in self._segments.values()
            if segment is not self._current and segment.closed_at is not None
        )

    def delete_segments_before(self, number: int) -> list[int]:
        """Delete closed segments numbered below ``number``; return the numbers deleted."""
        deleted = []
        for old in sorted(self._segments):
            if old >= number or self._current is None or old >= self._current.number:
                break
            segment = self._segments[old]
            if segment.fd == self._syncing_fd:
                break
            os.close(segment.fd)
            segment.path.unlink()
            del self._segments[old]
            deleted.append(old)
        if deleted:
            _fsync_directory(self.directory)
            logger.info("deleted log segments %s", deleted)
        return deleted

    def close(self) -> None:
        """fsync and close every segment and release the directory lock."""
        if self._current is not None and self._failed is None:
            os.fsync(self._current.fd)
            self._synced = self._written
        for segment in self._segments.values():
            os.close(segment.fd)
        self._segments.clear()
        self._current = None
        self._executor.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _read_all(fd: int) -> bytearray:
    """Read a whole segment into one buffer, without an extra copy to join pieces."""
    size = os.fstat(fd).st_size
    data = bytearray(size)
    view = memoryview(data)
    offset = 0
    while offset < size:
        done = os.preadv(fd, [view[offset:]], offset)
        if done == 0:
            break
        offset += done
    view.release()
    del data[offset:]
    return data


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
