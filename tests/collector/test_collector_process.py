"""The ``telemetry-collector`` program as real processes: CLI, signals, several collectors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from telemetry.database import make_engine
from telemetry.queue_client import OutgoingMessage, QueueClient
from telemetry.record import TELEMETRY_QUEUE, TelemetryRecord
from telemetry.tables import TelemetrySample

PORT_PATTERN = re.compile(r"endpoints on http://127\.0\.0\.1:(\d+)")


class CollectorProcess:
    """A ``python -m collector`` process with its log file and health port."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout_s: float = 20.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = PORT_PATTERN.search(self.log_path.read_text())
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise AssertionError(f"collector exited early:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"collector logged no port:\n{self.log_path.read_text()}")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=5)

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"metric {name} not found")

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=timeout_s)


@pytest.fixture
def start_collector(tmp_path: Path) -> Iterator[Callable[..., CollectorProcess]]:
    """Return a function that starts a collector process; all are ended after the test."""
    started: list[CollectorProcess] = []

    def start(queue_url: str, database_url: str, **settings: Any) -> CollectorProcess:
        log_path = tmp_path / f"collector-{len(started)}.log"
        env = {
            **os.environ,
            "COLLECTOR_QUEUE_URLS": queue_url,
            "DATABASE_URL": database_url,
            "COLLECTOR_PORT": "0",
            "COLLECTOR_WAIT_S": "1",
        }
        env.update({f"COLLECTOR_{name.upper()}": str(value) for name, value in settings.items()})
        command = [sys.executable]
        if _coverage_active():
            # A SIGTERM stop writes the process's coverage data; a SIGKILL loses it.
            command += ["-m", "coverage", "run", "--parallel-mode"]
        command += ["-m", "collector"]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        collector = CollectorProcess(process, log_path)
        started.append(collector)
        return collector

    yield start
    for collector in started:
        if collector.process.poll() is None:
            collector.process.kill()
            collector.process.wait()


def _coverage_active() -> bool:
    try:
        import coverage
    except ImportError:
        return False
    return coverage.Coverage.current() is not None


def _publish(queue_url: str, records: list[TelemetryRecord]) -> None:
    async def publish() -> None:
        async with QueueClient(queue_url) as queue:
            await queue.create_queue(TELEMETRY_QUEUE)
            for start in range(0, len(records), 1000):
                chunk = records[start : start + 1000]
                await queue.publish(
                    TELEMETRY_QUEUE,
                    [OutgoingMessage(body=record.to_body(), key=record.key) for record in chunk],
                )

    asyncio.run(publish())


def _stats(queue_url: str) -> dict[str, Any]:
    response = httpx.get(f"{queue_url}/v1/queues/{TELEMETRY_QUEUE}", timeout=5)
    response.raise_for_status()
    return dict(response.json()["stats"])


def _counts(database_url: str) -> tuple[int, int]:
    """Return the number of samples and of distinct idempotency keys."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            key = TelemetrySample.__table__.c.idempotency_key  # type: ignore[attr-defined]
            total = connection.execute(select(func.count()).select_from(TelemetrySample))
            distinct = connection.execute(select(func.count(key.distinct())))
            return int(total.scalar_one()), int(distinct.scalar_one())
    finally:
        engine.dispose()


def _wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.05)


def _many_records(records_from_csv: Callable[..., list[TelemetryRecord]], real_csv: Path, runs: int) -> list[TelemetryRecord]:
    records: list[TelemetryRecord] = []
    for run in range(runs):
        records += records_from_csv(real_csv, run=f"run{run}")
    return records


def test_help_lists_settings() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "collector", "--help"], capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 0
    for variable in (
        "COLLECTOR_QUEUE_URLS",
        "COLLECTOR_QUEUE_TOKEN",
        "DATABASE_URL",
        "COLLECTOR_BATCH_SIZE",
        "COLLECTOR_WAIT_S",
        "COLLECTOR_VISIBILITY_TIMEOUT_S",
        "COLLECTOR_PORT",
    ):
        assert variable in result.stdout


@pytest.mark.parametrize(
    ("variable", "value"),
    [("COLLECTOR_BATCH_SIZE", "many"), ("COLLECTOR_BATCH_SIZE", "5000"), ("COLLECTOR_WAIT_S", "60")],
    ids=["not-a-number", "batch-too-large", "wait-too-long"],
)
def test_invalid_setting_exits_2(variable: str, value: str) -> None:
    env = {**os.environ, variable: value}
    result = subprocess.run(
        [sys.executable, "-m", "collector"], capture_output=True, text=True, env=env, timeout=30
    )

    assert result.returncode == 2
    assert value in result.stderr


def test_sigterm_acks_in_hand_and_exits_0(
    queue_url: str,
    migrated_url: str,
    real_records: list[TelemetryRecord],
    start_collector: Callable[..., CollectorProcess],
) -> None:
    collector = start_collector(queue_url, migrated_url, batch_size=100)
    assert collector.get("/healthz").status_code == 200
    assert collector.get("/readyz").status_code == 200

    _publish(queue_url, real_records)
    _wait_until(lambda: _counts(migrated_url)[0] > 0)
    metrics_text = collector.get("/metrics").text
    status = collector.stop(signal.SIGTERM)
    stats = _stats(queue_url)
    stored, distinct = _counts(migrated_url)

    assert status == 0
    assert stats["leased"] == 0
    assert stats["acked_total"] == stored
    assert stats["ready"] == len(real_records) - stored
    assert distinct == stored
    for name in (
        "telemetry_collector_messages_stored_total",
        "telemetry_collector_duplicates_ignored_total",
        "telemetry_collector_batch_commit_seconds_bucket",
        "telemetry_collector_lag_seconds",
    ):
        assert name in metrics_text
    assert "collector stopped" in collector.log_path.read_text()


def test_three_collectors_store_each_message_once(
    queue_url: str,
    migrated_url: str,
    real_csv: Path,
    records_from_csv: Callable[..., list[TelemetryRecord]],
    start_collector: Callable[..., CollectorProcess],
) -> None:
    records = _many_records(records_from_csv, real_csv, runs=2)
    collectors = [start_collector(queue_url, migrated_url, batch_size=100) for _ in range(3)]

    _publish(queue_url, records)
    _wait_until(lambda: _stats(queue_url)["acked_total"] == len(records))
    stored_by_collector = [
        collector.metric("telemetry_collector_messages_stored_total") for collector in collectors
    ]
    statuses = [collector.stop(signal.SIGTERM) for collector in collectors]

    assert statuses == [0, 0, 0]
    assert _counts(migrated_url) == (len(records), len(records))
    assert sum(stored_by_collector) == len(records)
    assert sum(1 for stored in stored_by_collector if stored > 0) >= 2


def test_sigkill_mid_run_loses_nothing(
    queue_url: str,
    migrated_url: str,
    real_csv: Path,
    records_from_csv: Callable[..., list[TelemetryRecord]],
    start_collector: Callable[..., CollectorProcess],
) -> None:
    records = _many_records(records_from_csv, real_csv, runs=3)
    _publish(queue_url, records)

    victim = start_collector(queue_url, migrated_url, batch_size=200, visibility_timeout_s=2)
    _wait_until(lambda: _counts(migrated_url)[0] > 0, timeout_s=30)
    victim.stop(signal.SIGKILL)
    stored_before_kill = _counts(migrated_url)[0]

    survivor = start_collector(queue_url, migrated_url, batch_size=200, visibility_timeout_s=2)
    _wait_until(
        lambda: _stats(queue_url)["ready"] == 0
        and _stats(queue_url)["leased"] == 0
        and _counts(migrated_url)[0] == len(records)
    )
    status = survivor.stop(signal.SIGTERM)

    assert stored_before_kill < len(records)
    assert status == 0
    assert _counts(migrated_url) == (len(records), len(records))
