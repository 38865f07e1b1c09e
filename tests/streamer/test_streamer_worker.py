"""The streamer's control loop against an in-memory queue double."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from streamer_test_support import FakeQueue

from streamer.metrics import StreamerMetrics
from streamer.pacing import RateLimiter
from streamer.shards import RunMessage, ShardMessage
from streamer.worker import CONTROL_QUEUE, Streamer, StreamerConfig, StreamerError
from telemetry.queue_client import OutgoingMessage
from telemetry.record import TELEMETRY_QUEUE, TelemetryRecord
from telemetry.settings import InvalidConfig

pytestmark = pytest.mark.anyio


def config(csv: Path, **overrides: Any) -> StreamerConfig:
    settings: dict[str, Any] = {"interval_s": 0.0, "passes": 3, "rows_per_shard": 10, "lease_wait_s": 0.05}
    settings.update(overrides)
    return StreamerConfig(csv_path=csv, **settings)


def published_records(queue: FakeQueue) -> list[TelemetryRecord]:
    return [TelemetryRecord.parse_body(body) for body in queue.queues[TELEMETRY_QUEUE].published]


def line_and_pass(record: TelemetryRecord) -> tuple[int, int]:
    _, _, pass_index, line = record.key.rsplit(":", 3)
    return int(line), int(pass_index)


async def test_one_streamer_publishes_every_row_per_pass(fake_queue: FakeQueue, small_csv: Path) -> None:
    streamer = Streamer(fake_queue, config(small_csv))  # type: ignore[arg-type]

    await asyncio.wait_for(streamer.run(), timeout=10)

    records = published_records(fake_queue)
    assert len(records) == 240
    assert len({record.key for record in records}) == 240
    assert Counter(line_and_pass(r)[1] for r in records) == {0: 80, 1: 80, 2: 80}
    assert fake_queue.queues[CONTROL_QUEUE].messages == {}
    assert streamer.metrics.rows_published._value.get() == 240
    assert all(record.key.startswith("small.csv:") for record in records)


async def test_published_rows_stamped_in_order(fake_queue: FakeQueue, small_csv: Path) -> None:
    started = datetime.now(UTC)
    streamer = Streamer(fake_queue, config(small_csv, passes=2, rows_per_shard=100))  # type: ignore[arg-type]

    await asyncio.wait_for(streamer.run(), timeout=10)

    finished = datetime.now(UTC)
    records = published_records(fake_queue)
    times = [record.timestamp for record in records]
    assert len(records) == 160
    assert len(set(times)) == 160
    assert times == sorted(times)
    assert started.replace(microsecond=0) <= times[0]
    assert times[-1] <= finished
    assert streamer.metrics.rows_read._value.get() == 160


async def test_streamers_share_passes_without_overlap(fake_queue: FakeQueue, small_csv: Path) -> None:
    streamers = [Streamer(fake_queue, config(small_csv, interval_s=0.05)) for _ in range(3)]  # type: ignore[arg-type]

    await asyncio.wait_for(asyncio.gather(*(s.run() for s in streamers)), timeout=10)

    records = published_records(fake_queue)
    assert len(records) == 240
    assert Counter(line_and_pass(r) for r in records).most_common(1)[0][1] == 1
    assert sum(s.metrics.shards_completed._value.get() for s in streamers) == 24
    assert len({r.key.split(":")[1] for r in records}) == 1  # one run id shared by all


async def test_stopped_streamer_hands_shard_back(fake_queue: FakeQueue, small_csv: Path) -> None:
    slow = Streamer(fake_queue, config(small_csv, batch_size=5, rate=200, passes=2, concurrent_shards=1))  # type: ignore[arg-type]
    steady = Streamer(fake_queue, config(small_csv, passes=2))  # type: ignore[arg-type]

    slow_task = asyncio.create_task(slow.run())
    while slow.metrics.shards_held._value.get() == 0:
        await asyncio.sleep(0.005)
    slow.request_stop()
    await asyncio.wait_for(slow_task, timeout=5)
    handed_back = [
        m.visible_at for m in fake_queue.queues[CONTROL_QUEUE].messages.values() if m.deliveries and not m.leased
    ]
    stopped_at = time.monotonic()
    await asyncio.wait_for(steady.run(), timeout=10)

    assert len(handed_back) == 1
    assert handed_back[0] <= stopped_at  # ready again at once
    assert {line_and_pass(r) for r in published_records(fake_queue)} == {
        (line, pass_index) for line in range(2, 82) for pass_index in range(2)
    }


async def test_concurrent_shards_all_handed_back(fake_queue: FakeQueue, small_csv: Path) -> None:
    streamer = Streamer(fake_queue, config(small_csv, batch_size=5, rate=100, passes=2, concurrent_shards=3))  # type: ignore[arg-type]

    task = asyncio.create_task(streamer.run())
    async with asyncio.timeout(5):
        while streamer.metrics.shards_held._value.get() < 3:
            await asyncio.sleep(0.005)
    streamer.request_stop()
    await asyncio.wait_for(task, timeout=5)
    messages = fake_queue.queues[CONTROL_QUEUE].messages.values()

    assert sum(1 for m in messages if m.deliveries and not m.leased) == 3
    assert not any(m.leased for m in messages)
    assert streamer.metrics.shards_held._value.get() == 0


async def test_concurrent_shards_publish_each_row_once(fake_queue: FakeQueue, small_csv: Path) -> None:
    streamer = Streamer(fake_queue, config(small_csv, concurrent_shards=4))  # type: ignore[arg-type]

    await asyncio.wait_for(streamer.run(), timeout=10)

    assert sorted(line_and_pass(r) for r in published_records(fake_queue)) == sorted(
        (line, pass_index) for line in range(2, 82) for pass_index in range(3)
    )
    assert fake_queue.queues[CONTROL_QUEUE].messages == {}


@pytest.mark.parametrize("concurrent_shards", [0, 17])
def test_config_rejects_concurrent_shards_out_of_range(small_csv: Path, concurrent_shards: int) -> None:
    with pytest.raises(InvalidConfig, match="concurrent_shards=.* is invalid: expected 1 to 16"):
        config(small_csv, concurrent_shards=concurrent_shards)


@pytest.mark.parametrize("window_passed", [True, False], ids=["after-dedup-window", "within-dedup-window"])
async def test_second_run_uses_new_keys(fake_queue: FakeQueue, small_csv: Path, window_passed: bool) -> None:
    await Streamer(fake_queue, config(small_csv, passes=1)).run()  # type: ignore[arg-type]
    first_keys = {r.key for r in published_records(fake_queue)}
    if window_passed:
        for queue in fake_queue.queues.values():
            queue.keys.clear()

    await Streamer(fake_queue, config(small_csv, passes=1)).run()  # type: ignore[arg-type]

    all_keys = {r.key for r in published_records(fake_queue)}
    assert len(first_keys) == 80
    assert len(all_keys) == 160


async def test_pass_schedule_follows_interval(fake_queue: FakeQueue, small_csv: Path) -> None:
    started = time.monotonic()

    await Streamer(fake_queue, config(small_csv, interval_s=0.2, rows_per_shard=100)).run()  # type: ignore[arg-type]

    assert time.monotonic() - started >= 0.4
    times = sorted(r.timestamp for r in published_records(fake_queue))
    assert (times[-1] - times[0]).total_seconds() >= 0.38


async def test_rejected_rows_counted_and_logged_once(
    fake_queue: FakeQueue, small_csv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = small_csv.read_bytes().splitlines(keepends=True)
    for number in (3, 5, 7):
        lines[number] = lines[number].replace(b'"nvidia', b'"x","nvidia', 1)
    small_csv.write_bytes(b"".join(lines))
    metrics = StreamerMetrics()

    with caplog.at_level(logging.WARNING, logger="streamer.metrics"):
        await Streamer(fake_queue, config(small_csv, passes=2), metrics=metrics).run()  # type: ignore[arg-type]

    assert metrics.rows_rejected.labels(reason="column_count")._value.get() == 6
    assert metrics.rows_read._value.get() == 160
    assert len(published_records(fake_queue)) == 154
    messages = [r.getMessage() for r in caplog.records if r.name == "streamer.metrics"]
    assert len(messages) == 1
    assert "line 4 (column_count)" in messages[0]


async def test_lag_reported_when_behind(fake_queue: FakeQueue, small_csv: Path) -> None:
    streamer = Streamer(fake_queue, config(small_csv, passes=2, interval_s=0.01, rate=200))  # type: ignore[arg-type]
    lag_seen: list[float] = []

    async def watch() -> None:
        while True:
            lag_seen.append(streamer.metrics.schedule_lag._value.get())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    await streamer.run()
    watcher.cancel()

    # 160 rows at 200 rows/s take 0.8 s, so the second pass starts late.
    assert max(lag_seen) > 0.2


async def test_missing_csv_is_an_error(fake_queue: FakeQueue, tmp_path: Path) -> None:
    with pytest.raises(StreamerError, match="does not exist"):
        await Streamer(fake_queue, config(tmp_path / "absent.csv")).run()  # type: ignore[arg-type]


async def test_foreign_shard_left_for_others(fake_queue: FakeQueue, small_csv: Path) -> None:
    plan = [[100, 200, 2], [200, 300, 4]]
    foreign = RunMessage(
        run_id="r1", source="other.csv", file_size=999, passes=1, run_start=time.time(), interval_s=1, shards=plan
    )
    await fake_queue.create_queue(CONTROL_QUEUE)
    await fake_queue.publish(CONTROL_QUEUE, [OutgoingMessage(body=foreign.to_body(), key="run:other")])
    stranger = Streamer(fake_queue, config(small_csv, passes=1))  # type: ignore[arg-type]

    task = asyncio.create_task(stranger.run())
    await asyncio.sleep(0.3)
    stranger.request_stop()
    await asyncio.wait_for(task, 5)

    assert published_records(fake_queue) == []
    left = [ShardMessage.from_body(m.body) for m in fake_queue.queues[CONTROL_QUEUE].messages.values()]
    assert {(shard.source, shard.index) for shard in left} == {("other.csv", 0), ("other.csv", 1)}


async def test_foreign_shards_dropped_after_takeover_time(fake_queue: FakeQueue, small_csv: Path) -> None:
    plan = [[100, 200, 2], [200, 300, 4]]
    foreign = RunMessage(
        run_id="r1", source="other.csv", file_size=999, passes=0, run_start=time.time(), interval_s=1, shards=plan
    )
    await fake_queue.create_queue(CONTROL_QUEUE)
    await fake_queue.publish(CONTROL_QUEUE, [OutgoingMessage(body=foreign.to_body(), key="run:other")])
    streamer = Streamer(fake_queue, config(small_csv, passes=1, foreign_takeover_s=0.3))  # type: ignore[arg-type]

    await asyncio.wait_for(streamer.run(), timeout=10)

    records = published_records(fake_queue)
    assert len(records) == 80
    assert {line_and_pass(record)[1] for record in records} == {0}
    assert all(record.key.startswith("small.csv:") for record in records)
    assert fake_queue.queues[CONTROL_QUEUE].messages == {}


def test_foreign_takeover_time_must_be_positive(small_csv: Path) -> None:
    with pytest.raises(InvalidConfig, match="foreign_takeover_s=0 is invalid"):
        config(small_csv, foreign_takeover_s=0)


async def test_rate_limiter_spreads_batches() -> None:
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(100, clock=lambda: now[0], sleep=fake_sleep)
    for _ in range(4):
        await limiter.acquire(50)

    assert slept == [0.5, 0.5, 0.5]


async def test_rate_limiter_without_cap_never_waits() -> None:
    limiter = RateLimiter(0)

    assert await limiter.acquire(10_000) == 0.0


def test_config_rejects_oversized_batch(small_csv: Path) -> None:
    with pytest.raises(InvalidConfig, match="batch_size=1001 is invalid: expected 1 to 1000"):
        StreamerConfig(csv_path=small_csv, batch_size=1001)


async def test_early_shard_handed_back_until_due(fake_queue: FakeQueue, small_csv: Path) -> None:
    now = [1_000_000.0]
    settings = config(small_csv, passes=2, interval_s=100_000)
    streamer = Streamer(fake_queue, settings, clock=lambda: now[0])  # type: ignore[arg-type]
    task = asyncio.create_task(streamer.run())
    while streamer.metrics.shards_completed._value.get() < 8:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    control = fake_queue.queues[CONTROL_QUEUE]
    first_delays = [message.visible_at - time.monotonic() for message in control.messages.values()]

    for message in control.messages.values():
        message.visible_at = time.monotonic()  # as if the queue's delay had passed
    await asyncio.sleep(0.3)
    second_delays = [message.visible_at - time.monotonic() for message in control.messages.values()]
    deliveries = [message.deliveries for message in control.messages.values()]
    streamer.request_stop()
    await asyncio.wait_for(task, 5)

    assert len(published_records(fake_queue)) == 80
    assert len(first_delays) == 8
    assert all(43_000 < delay <= 43_200 for delay in first_delays)
    assert all(43_000 < delay <= 43_200 for delay in second_delays)
    assert deliveries == [1] * 8


async def test_stop_while_queue_unreachable(fake_queue: FakeQueue, small_csv: Path) -> None:
    streamer = Streamer(fake_queue, config(small_csv, passes=0, interval_s=0.05))  # type: ignore[arg-type]
    task = asyncio.create_task(streamer.run())
    while not streamer.ready:
        await asyncio.sleep(0.01)
    lease_started = asyncio.Event()

    async def lease_that_keeps_retrying(*args: Any, **kwargs: Any) -> list[Any]:
        lease_started.set()
        await asyncio.sleep(3600)  # as a client retrying against a queue that is down
        return []

    fake_queue.lease = lease_that_keeps_retrying  # type: ignore[method-assign]
    await asyncio.wait_for(lease_started.wait(), 5)
    streamer.request_stop()

    await asyncio.wait_for(task, 2)
    assert not streamer.ready
