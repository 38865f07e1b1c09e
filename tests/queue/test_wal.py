"""The write-ahead log: frame codec, record codec, torn tails and corruption."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_server.errors import CorruptLog, DataDirLocked
from queue_server.wal.frame import HEADER_SIZE, encode_frame, scan_frames
from queue_server.wal.log import FsyncPolicy, WriteAheadLog, list_segments
from queue_server.wal.records import PublishHeader, decode_publish, encode_publish

payloads = st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=12)


def frame_bounds(items: list[bytes]) -> list[tuple[int, int]]:
    bounds, offset = [], 0
    for item in items:
        bounds.append((offset, offset + HEADER_SIZE + len(item)))
        offset += HEADER_SIZE + len(item)
    return bounds


@given(payloads)
def test_frames_round_trip(items: list[bytes]) -> None:
    data = b"".join(encode_frame(item) for item in items)
    result = scan_frames(data, path="seg", final=True)
    assert [bytes(payload) for _, payload in result.frames] == items
    assert result.end == len(data)
    assert not result.torn


@given(payloads, st.data())
def test_truncated_tail_recovers_whole_records(items: list[bytes], data: st.DataObject) -> None:
    log = b"".join(encode_frame(item) for item in items)
    cut = data.draw(st.integers(0, len(log) - 1))
    result = scan_frames(log[:cut], path="seg", final=True)
    whole = sum(1 for _, end in frame_bounds(items) if end <= cut)
    clean_end = frame_bounds(items)[whole - 1][1] if whole else 0
    assert [bytes(payload) for _, payload in result.frames] == items[:whole]
    assert result.end == clean_end
    assert result.torn == (cut != clean_end)


@given(payloads, st.data())
def test_flipped_byte_never_passes_silently(items: list[bytes], data: st.DataObject) -> None:
    log = bytearray(b"".join(encode_frame(item) for item in items))
    position = data.draw(st.integers(0, len(log) - 1))
    log[position] ^= data.draw(st.integers(1, 255))
    bounds = frame_bounds(items)
    damaged = next(i for i, (start, end) in enumerate(bounds) if start <= position < end)
    try:
        result = scan_frames(bytes(log), path="seg", final=True)
    except CorruptLog as error:
        assert error.offset == bounds[damaged][0]
        assert "seg" in str(error)
        return
    # Only damage to the last record may pass as a torn write, and then it is dropped.
    assert damaged == len(items) - 1
    assert [bytes(payload) for _, payload in result.frames] == items[:-1]


def test_zero_filled_tail_is_torn() -> None:
    log = encode_frame(b"one") + encode_frame(b"two") + bytes(100)
    result = scan_frames(log, path="seg", final=True)
    assert [bytes(p) for _, p in result.frames] == [b"one", b"two"]
    assert result.torn


def test_damage_in_earlier_segment_is_corruption() -> None:
    log = encode_frame(b"one") + encode_frame(b"two")
    with pytest.raises(CorruptLog, match="'seg-1'"):
        scan_frames(log[:-1], path="seg-1", final=False)


@given(
    st.lists(st.binary(max_size=200), min_size=1, max_size=20),
    st.lists(st.tuples(st.integers(0, 19), st.integers(0, 2**60 - 1)), max_size=5),
    st.floats(0, 2e9, allow_nan=False),
)
def test_publish_record_round_trip(bodies: list[bytes], keys: list[tuple[int, int]], published_at: float) -> None:
    header = PublishHeader("jobs", 42, published_at, keys, {0: published_at + 5})
    payload, offsets, body_start = encode_publish(header, bodies)
    decoded = decode_publish(memoryview(payload))
    assert list(zip(decoded.key_indexes, decoded.key_hashes, strict=True)) == keys
    decoded.header.key_hashes = keys
    assert decoded.header == header
    assert decoded.offsets == offsets
    assert decoded.body_start == body_start
    assert [payload[body_start + offsets[i] : body_start + offsets[i + 1]] for i in range(len(bodies))] == bodies


def write_log(directory: Path, items: list[bytes], segment_bytes: int = 1 << 20) -> None:
    wal = WriteAheadLog(directory, fsync=FsyncPolicy.NEVER, segment_bytes=segment_bytes)
    wal.lock()
    list(wal.recover())
    wal.start_segment(b"checkpoint")
    for item in items:
        wal.append(item)
        if wal.needs_new_segment():
            wal.start_segment(b"checkpoint")
    wal.close()


def read_log(directory: Path) -> list[bytes]:
    wal = WriteAheadLog(directory)
    wal.lock()
    try:
        return [bytes(payload) for _, payload in wal.recover()]
    finally:
        wal.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=100), min_size=1, max_size=10), st.data())
def test_recovery_truncates_torn_tail_on_disk(items: list[bytes], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        write_log(directory, items)
        (_, path), = list_segments(directory)
        size = path.stat().st_size
        cut = data.draw(st.integers(HEADER_SIZE + len(b"checkpoint"), size))
        os.truncate(path, cut)
        recovered = read_log(directory)
        assert recovered == [b"checkpoint", *items][: len(recovered)]
        assert path.stat().st_size <= cut
        # After truncation the log accepts appends and reads back cleanly.
        write_log(directory, [b"after"])
        assert read_log(directory)[-2:] == [b"checkpoint", b"after"]


def test_recovery_stops_on_corrupt_middle_segment(tmp_path: Path) -> None:
    write_log(tmp_path, [bytes([i]) * 200 for i in range(20)], segment_bytes=1000)
    segments = list_segments(tmp_path)
    assert len(segments) > 2
    _, first = segments[0]
    data = bytearray(first.read_bytes())
    data[HEADER_SIZE + 20] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(CorruptLog) as error:
        read_log(tmp_path)
    assert str(first) in str(error.value)
    assert error.value.offset == HEADER_SIZE + len(b"checkpoint")


def test_second_writer_is_locked_out(tmp_path: Path) -> None:
    first = WriteAheadLog(tmp_path)
    first.lock()
    second = WriteAheadLog(tmp_path)
    with pytest.raises(DataDirLocked, match="locked by another queue server"):
        second.lock()
    first.close()


def test_group_commit_shares_fsync(tmp_path: Path) -> None:
    durations: list[float] = []
    wal = WriteAheadLog(tmp_path, sync_listener=durations.append)
    wal.lock()
    list(wal.recover())
    wal.start_segment(b"checkpoint")

    async def writers() -> None:
        async def write(i: int) -> None:
            _, end = wal.append(b"x" * 100)
            await wal.wait_durable(end)

        await asyncio.gather(*(write(i) for i in range(50)))

    asyncio.run(writers())
    wal.close()
    assert 1 <= len(durations) < 50
