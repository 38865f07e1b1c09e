"""Processing timestamps: format, order and behaviour when the clock stalls or steps back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streamer.stamps import ProcessingClock
from telemetry.record import format_timestamp


def clock_of(readings_us: list[int]) -> ProcessingClock:
    """A ProcessingClock whose wall clock returns ``readings_us`` (microseconds) in turn."""
    values = iter(readings_us)
    return ProcessingClock(clock_ns=lambda: next(values) * 1000)


def as_text(microseconds: int) -> str:
    return format_timestamp(datetime.fromtimestamp(microseconds / 1_000_000, UTC))


@pytest.mark.parametrize(
    "reading_us",
    [1_784_000_000_000_000, 1_784_000_000_000_001, 1_784_000_000_999_999, 1_767_225_599_123_456],
    ids=["whole-second", "one-microsecond", "last-microsecond", "year-end"],
)
def test_stamp_matches_format_timestamp(reading_us: int) -> None:
    assert clock_of([reading_us]).stamp() == as_text(reading_us)


def test_stamp_of_real_clock_is_now() -> None:
    before = datetime.now(UTC)
    stamp = ProcessingClock().stamp()
    after = datetime.now(UTC)

    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before.replace(microsecond=0) <= moment <= after
    assert stamp.endswith("Z")
    assert len(stamp) == len("2026-01-02T03:04:05.000006Z")


def test_ties_get_distinct_increasing_stamps() -> None:
    base = 1_784_000_000_999_999
    clock = clock_of([base, base, base, base + 1])

    stamps = [clock.stamp() for _ in range(4)]

    assert stamps == [as_text(base), as_text(base + 1), as_text(base + 2), as_text(base + 3)]


def test_small_step_back_keeps_order() -> None:
    base = 1_784_000_000_500_000
    clock = clock_of([base, base - 999])

    assert [clock.stamp(), clock.stamp()] == [as_text(base), as_text(base + 1)]


def test_large_step_back_follows_clock() -> None:
    base = 1_784_000_000_500_000
    clock = clock_of([base, base - 5_000_000])

    assert [clock.stamp(), clock.stamp()] == [as_text(base), as_text(base - 5_000_000)]


def test_second_boundary_updates_prefix() -> None:
    base = 1_784_000_000_999_999
    clock = clock_of([base, base + 1, base + 60_000_001])

    assert [clock.stamp() for _ in range(3)] == [as_text(base), as_text(base + 1), as_text(base + 60_000_001)]
