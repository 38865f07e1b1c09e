"""Real streamer processes against a real queue server: work sharing, stops, crashes, backpressure."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from streamer_test_support import StreamerProcess, write_dump

from streamer.worker import Streamer, StreamerConfig
from telemetry.queue_client import QueueClient, RetryPolicy
from telemetry.record import TELEMETRY_QUEUE, TelemetryRecord

pytestmark = pytest.mark.slow


def drain_telemetry(queue_url: str) -> list[TelemetryRecord]:
    """Lease every message off the telemetry queue and return the records."""

    async def drain() -> list[TelemetryRecord]:
        records: list[TelemetryRecord] = []
        async with QueueClient(queue_url, http2=False) as queue:
            while True:
                leased = await queue.lease(TELEMETRY_QUEUE, max_messages=1000, wait_s=0)
                if not leased:
                    return records
                records.extend(TelemetryRecord.parse_body(message.body) for message in leased)

    return asyncio.run(drain())


def line_and_pass(record: TelemetryRecord) -> tuple[int, int]:
    _, _, pass_index, line = record.key.rsplit(":", 3)
    return int(line), int(pass_index)


def expected_keys(rows: int, passes: int) -> set[tuple[int, int]]:
    return {(line, pass_index) for line in range(2, rows + 2) for pass_index in range(passes)}


def assert_each_row_once_per_pass(records: list[TelemetryRecord], rows: int, passes: int) -> None:
    counts = Counter(line_and_pass(record) for record in records)
    assert set(counts) == expected_keys(rows, passes)
    assert max(counts.values()) == 1
    assert len({record.key.split(":")[1] for record in records}) == 1


def test_three_streamers_three_passes(queue_server: Any, streamers: Any, tmp_path: Path) -> None:
    csv = write_dump(tmp_path / "dump.csv", hosts=4, gpus_per_host=4)  # 160 rows
    options = {"passes": 3, "interval": 0.3, "rows_per_shard": 20}

    processes = [streamers(queue_server.url, csv, **options) for _ in range(3)]
    codes = [process.wait(timeout_s=60) for process in processes]

    assert codes == [0, 0, 0]
    assert_each_row_once_per_pass(drain_telemetry(queue_server.url), rows=160, passes=3)


def control_stats(queue_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{queue_url}/v1/queues/telemetry.shards", timeout=5).json()["stats"]
    return stats


def wait_for_metric(process: StreamerProcess, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while process.metric(name) == 0:
        assert time.monotonic() < deadline, f"{name} stayed 0 for {timeout_s} s:\n{process.log_text()}"
        time.sleep(0.01)


def test_streamer_joins_and_another_stops(queue_server: Any, streamers: Any, tmp_path: Path) -> None:
    csv = write_dump(tmp_path / "dump.csv", hosts=2, gpus_per_host=4)  # 80 rows
    # With no interval every pass is due at once, so both streamers are always busy
    # and the stopped one is nearly always holding a shard, which it must hand back.
    options = {
        "passes": 10,
        "interval": 0,
        "rows_per_shard": 10,
        "batch_size": 5,
        "rate": 100,
        "concurrent_shards": 2,
    }

    first = streamers(queue_server.url, csv, **options)
    wait_for_metric(first, "streamer_shards_completed_total", timeout_s=15)
    second = streamers(queue_server.url, csv, **options)
    wait_for_metric(second, "streamer_shards_completed_total", timeout_s=5)
    wait_for_metric(first, "streamer_shards_held", timeout_s=5)
    stop_sent = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    first_code = first.wait(timeout_s=10)
    stop_took = time.monotonic() - stop_sent
    leased_after_stop = control_stats(queue_server.url)["leased"]
    second_code = second.wait(timeout_s=60)

    assert first_code == 0
    assert stop_took < 5
    # Only the shards of the running streamer are leased: nothing waits for a lease to expire.
    assert leased_after_stop <= options["concurrent_shards"]
    assert second_code == 0
    assert_each_row_once_per_pass(drain_telemetry(queue_server.url), rows=80, passes=10)


def test_killed_streamer_share_taken_over(queue_server: Any, streamers: Any, tmp_path: Path) -> None:
    csv = write_dump(tmp_path / "dump.csv", hosts=4, gpus_per_host=4)
    options = {"passes": 8, "interval": 0.4, "rows_per_shard": 20, "batch_size": 10, "rate": 400, "lease_timeout": 3}

    victim = streamers(queue_server.url, csv, **options)
    survivor = streamers(queue_server.url, csv, **options)
    wait_for_metric(victim, "streamer_shards_completed_total", timeout_s=15)
    wait_for_metric(victim, "streamer_shards_held", timeout_s=5)
    victim.process.send_signal(signal.SIGKILL)
    victim.wait(timeout_s=10)
    survivor_code = survivor.wait(timeout_s=90)

    assert survivor_code == 0
    assert control_stats(queue_server.url)["redelivered_total"] >= 1
    assert_each_row_once_per_pass(drain_telemetry(queue_server.url), rows=160, passes=8)


def test_real_csv_streamed_once(queue_server: Any, streamers: Any, real_csv: Path) -> None:
    process = streamers(queue_server.url, real_csv, passes=1, interval=0)

    assert process.wait(timeout_s=60) == 0
    records = drain_telemetry(queue_server.url)
    assert len(records) == 2470
    assert len({record.uuid for record in records}) == 247
    assert len({record.hostname for record in records}) == 31
    assert "rejected" not in process.log_text()


class RejectEveryOtherPublish(httpx.AsyncBaseTransport):
    """Transport that responds with 429 to every other publish request and forwards all other requests."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.publishes = 0
        self.rejected = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == f"/v1/queues/{TELEMETRY_QUEUE}/messages":
            self.publishes += 1
            if self.publishes % 2:
                self.rejected += 1
                return httpx.Response(429, headers={"retry-after": "0.05"}, json={"detail": "queue full"})
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.anyio
async def test_backpressure_slows_without_loss(queue_server: Any, tmp_path: Path) -> None:
    csv = write_dump(tmp_path / "dump.csv", hosts=2, gpus_per_host=4)  # 80 rows
    transport = RejectEveryOtherPublish()
    retry = RetryPolicy(max_attempts=None, initial_backoff_s=0.01, max_backoff_s=0.05)
    # One shard at a time, so the waits after the 16 rejections add up.
    config = StreamerConfig(
        csv_path=csv,
        interval_s=0,
        passes=2,
        rows_per_shard=20,
        batch_size=10,
        lease_wait_s=0.1,
        concurrent_shards=1,
    )

    async with QueueClient(queue_server.url, transport=transport, retry=retry) as queue:
        streamer = Streamer(queue, config)
        started = time.monotonic()
        await asyncio.wait_for(streamer.run(), timeout=60)
        elapsed = time.monotonic() - started

    assert transport.rejected == 16
    assert transport.publishes == 32
    assert elapsed >= 16 * 0.05
    assert streamer.metrics.rows_published._value.get() == 160
    assert_each_row_once_per_pass(await asyncio.to_thread(drain_telemetry, queue_server.url), rows=80, passes=2)


def test_queue_restart_loses_no_rows(queue_server: Any, streamers: Any, tmp_path: Path) -> None:
    csv = write_dump(tmp_path / "dump.csv", hosts=2, gpus_per_host=4)  # 80 rows
    options = {"passes": 6, "interval": 0.3, "rows_per_shard": 10, "batch_size": 5, "rate": 400}

    process = streamers(queue_server.url, csv, **options)
    wait_for_metric(process, "streamer_shards_completed_total", timeout_s=15)
    queue_server.kill()
    time.sleep(2)
    queue_server.start()
    code = process.wait(timeout_s=60)

    assert code == 0
    assert "failed" in process.log_text()  # the client logged the refused connections
    assert_each_row_once_per_pass(drain_telemetry(queue_server.url), rows=80, passes=6)
