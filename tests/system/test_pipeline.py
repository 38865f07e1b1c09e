"""End-to-end tests: queue, streamers, collectors and API as real processes on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from telemetry.database import make_engine
from telemetry.tables import TelemetrySample

from system_stack import Stack, free_port, wait_until

pytestmark = pytest.mark.slow

REAL_ROWS = 2470
REAL_GPUS = 247


def sample_count(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(TelemetrySample)).scalar_one())
    finally:
        engine.dispose()


def stored_keys(database_url: str) -> list[str]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(TelemetrySample.idempotency_key)).scalars())
    finally:
        engine.dispose()


def rows_per_pass(keys: list[str]) -> Counter[int]:
    """Count stored rows by pass; a key is ``{file}:{run id}:{pass}:{line}``."""
    return Counter(int(key.rsplit(":", 2)[1]) for key in keys)


def wait_for_count(database_url: str, expected: int, *, timeout_s: float) -> None:
    wait_until(
        lambda: sample_count(database_url) >= expected,
        timeout_s=timeout_s,
        what=f"{expected} stored samples",
    )
    # Nothing more arrives once the run is complete.
    time.sleep(3)
    assert sample_count(database_url) == expected


def assert_each_row_once_per_pass(database_url: str, passes: int, rows: int) -> None:
    keys = stored_keys(database_url)
    assert len(keys) == len(set(keys))
    lines = Counter(key.rsplit(":", 1)[1] for key in keys)
    assert len(lines) == rows
    assert set(lines.values()) == {passes}
    assert rows_per_pass(keys) == {p: rows for p in range(passes)}


def test_real_csv_three_passes(
    make_stack: Callable[..., Stack], real_csv: Path, database_url: str
) -> None:
    stack = make_stack(
        database_url=database_url,
        csv=real_csv,
        streamers=2,
        collectors=2,
        extra_env={"STREAMER_PASSES": "3", "STREAMER_INTERVAL_S": "3", "STREAMER_RESPAWN": "false"},
    )
    wait_for_count(database_url, 3 * REAL_ROWS, timeout_s=120)
    assert_each_row_once_per_pass(database_url, passes=3, rows=REAL_ROWS)

    gpus = httpx.get(f"{stack.api_url}/api/v1/gpus", timeout=30).json()
    assert gpus["count"] == REAL_GPUS
    assert len({gpu["id"] for gpu in gpus["items"]}) == REAL_GPUS

    for gpu in gpus["items"]:
        answer = httpx.get(f"{stack.api_url}/api/v1/gpus/{gpu['id']}/telemetry", timeout=30).json()
        stamps = [item["timestamp"] for item in answer["items"]]
        assert len(stamps) == 30, gpu["id"]
        assert stamps == sorted(stamps), gpu["id"]
        assert answer["next_cursor"] is None

    # A window from the first to the last sample of pass 1 contains exactly pass 1.
    engine = make_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(TelemetrySample.gpu_uuid, TelemetrySample.timestamp, TelemetrySample.idempotency_key)
        ).all()
    engine.dispose()
    pass_one = [row for row in rows if row.idempotency_key.rsplit(":", 2)[1] == "1"]
    start = min(row.timestamp for row in pass_one)
    end = max(row.timestamp for row in pass_one)
    outside = [row for row in rows if row.idempotency_key.rsplit(":", 2)[1] != "1"]
    assert all(not (start <= row.timestamp <= end) for row in outside), "passes overlap in time"

    by_gpu = Counter(row.gpu_uuid for row in pass_one)
    for gpu_uuid in list(by_gpu)[:20]:
        answer = httpx.get(
            f"{stack.api_url}/api/v1/gpus/{gpu_uuid}/telemetry",
            params={"start_time": _rfc3339(start), "end_time": _rfc3339(end)},
            timeout=30,
        ).json()
        assert len(answer["items"]) == by_gpu[gpu_uuid] == 10
    first = next(row for row in pass_one if row.timestamp == start)
    last = next(row for row in pass_one if row.timestamp == end)
    for row in (first, last):
        answer = httpx.get(
            f"{stack.api_url}/api/v1/gpus/{row.gpu_uuid}/telemetry",
            params={"start_time": _rfc3339(start), "end_time": _rfc3339(end)},
            timeout=30,
        ).json()
        assert _rfc3339(row.timestamp) in {_rfc3339(_parse(i["timestamp"])) for i in answer["items"]}


def stop_streamers_and_drain(stack: Stack) -> None:
    """Stop every streamer gracefully, then wait until collectors have stored everything."""
    stack.scale("streamer", 0)
    wait_until(lambda: stack.pids("streamer") == [], timeout_s=60, what="streamers to stop")

    def drained() -> bool:
        stats = httpx.get(f"{stack.queue_url}/v1/queues/telemetry", timeout=10).json()["stats"]
        return stats["ready"] == 0 and stats["leased"] == 0 and stats["delayed"] == 0

    wait_until(drained, timeout_s=120, what="the telemetry queue to drain")


def complete_passes(database_url: str, rows: int) -> int:
    """Return how many passes every one of ``rows`` lines has stored (0 while a line has none)."""
    counts = Counter(key.rsplit(":", 1)[1] for key in stored_keys(database_url))
    if len(counts) < rows:
        return 0
    return min(counts.values())


def wait_for_more_passes(database_url: str, rows: int, more: int, *, timeout_s: float = 120) -> int:
    """Wait until every line has ``more`` passes beyond those complete now; return the new count.

    The tests wait for stored passes rather than for a fixed time, so a slow
    machine makes them take longer instead of failing.
    """
    target = complete_passes(database_url, rows) + more
    wait_until(
        lambda: complete_passes(database_url, rows) >= target,
        timeout_s=timeout_s,
        what=f"every row stored in {target} passes",
    )
    return target


def assert_complete_passes(database_url: str, rows: int, *, min_passes: int) -> None:
    """Each row is stored once for every pass from 0 up to where streaming stopped.

    Shards advance independently, so when the streamers stop, one shard may be a
    pass ahead of another. What must never happen is a gap or a double.
    """
    keys = stored_keys(database_url)
    assert len(keys) == len(set(keys))
    passes_by_line: dict[str, list[int]] = {}
    for key in keys:
        _, pass_number, line = key.rsplit(":", 2)
        passes_by_line.setdefault(line, []).append(int(pass_number))
    assert len(passes_by_line) == rows
    for line, passes in passes_by_line.items():
        assert sorted(passes) == list(range(len(passes))), f"line {line} has passes {sorted(passes)}"
        assert len(passes) >= min_passes, f"line {line} reached only {len(passes)} passes"


def test_scaling_while_running(
    make_stack: Callable[..., Stack], real_csv: Path, sqlite_url: str
) -> None:
    stack = make_stack(
        database_url=sqlite_url,
        csv=real_csv,
        streamers=1,
        collectors=1,
        extra_env={"STREAMER_INTERVAL_S": "2"},
    )
    wait_until(lambda: sample_count(sqlite_url) > 0, timeout_s=60, what="the first stored sample")
    stack.scale("streamer", 3)
    stack.scale("collector", 4)
    wait_until(lambda: len(stack.pids("streamer")) == 3, timeout_s=30, what="3 streamers")
    wait_until(lambda: len(stack.pids("collector")) == 4, timeout_s=30, what="4 collectors")
    wait_for_more_passes(sqlite_url, REAL_ROWS, 2)
    stack.scale("streamer", 1)
    stack.scale("collector", 2)
    wait_until(lambda: len(stack.pids("streamer")) == 1, timeout_s=30, what="1 streamer")
    wait_until(lambda: len(stack.pids("collector")) == 2, timeout_s=30, what="2 collectors")
    reached = wait_for_more_passes(sqlite_url, REAL_ROWS, 2)

    stop_streamers_and_drain(stack)
    assert_complete_passes(sqlite_url, REAL_ROWS, min_passes=reached)


def test_queue_and_collector_killed(
    make_stack: Callable[..., Stack], real_csv: Path, sqlite_url: str
) -> None:
    stack = make_stack(
        database_url=sqlite_url,
        csv=real_csv,
        streamers=2,
        collectors=2,
        extra_env={"STREAMER_INTERVAL_S": "2"},
    )
    wait_until(lambda: sample_count(sqlite_url) > 0, timeout_s=60, what="the first stored sample")

    # circus restarts a killed process, as Kubernetes restarts a killed container.
    queue_pid = stack.pids("queue")[0]
    os.kill(queue_pid, signal.SIGKILL)
    wait_until(
        lambda: stack.pids("queue") not in ([], [queue_pid]), timeout_s=30, what="the queue restart"
    )
    wait_until(stack.queue_ready, timeout_s=30, what="the restarted queue")

    before = sample_count(sqlite_url)
    wait_until(
        lambda: sample_count(sqlite_url) > before, timeout_s=60, what="ingest after the queue restart"
    )
    os.kill(stack.pids("collector")[0], signal.SIGKILL)
    reached = wait_for_more_passes(sqlite_url, REAL_ROWS, 2)

    stop_streamers_and_drain(stack)
    assert_complete_passes(sqlite_url, REAL_ROWS, min_passes=reached)


def test_bad_rows_end_to_end(
    make_stack: Callable[..., Stack], real_csv: Path, sqlite_url: str, tmp_path: Path
) -> None:
    with real_csv.open(newline="", encoding="utf-8") as source:
        reader = csv.reader(source)
        header = next(reader)
        good = [next(reader) for _ in range(40)]
    column = {name: index for index, name in enumerate(header)}

    def changed(row: list[str], **fields: str) -> list[str]:
        copy = list(row)
        for name, value in fields.items():
            copy[column[name]] = value
        return copy

    bad_rows = [
        good[0] + ["extra"],  # column_count
        changed(good[1], value="zero"),  # invalid_value
        changed(good[2], uuid=""),  # missing_field
        changed(good[3], value="NaN"),  # non_finite_value
    ]
    rows = [header, *good[:20], *bad_rows, changed(good[4], Hostname="HOSTMARK"), *good[20:]]
    buffer = io.StringIO()
    csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    mixed = tmp_path / "mixed.csv"
    # One row carries bytes that are not UTF-8.
    mixed.write_bytes(buffer.getvalue().encode().replace(b"HOSTMARK", b"host-\xff\xfe"))
    bad_count = len(bad_rows) + 1

    metrics_port = free_port()
    stack = make_stack(
        database_url=sqlite_url,
        csv=mixed,
        streamers=1,
        collectors=1,
        extra_env={"STREAMER_INTERVAL_S": "3600", "STREAMER_PORT": str(metrics_port)},
    )
    wait_for_count(sqlite_url, len(good), timeout_s=60)

    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    rejected = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("streamer_rows_rejected_total{")
    }
    assert sum(rejected.values()) == bad_count
    assert rejected["column_count"] == 1
    assert rejected["invalid_utf8"] == 1
    assert rejected["missing_field"] == 1
    assert rejected["invalid_value"] + rejected["non_finite_value"] == 2
    assert stack.stop() == 0


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_database_outage(
    make_stack: Callable[..., Stack], real_csv: Path, temporary_postgres: Any
) -> None:
    database_url = temporary_postgres.url
    stack = make_stack(
        database_url=database_url,
        csv=real_csv,
        streamers=2,
        collectors=2,
        extra_env={"STREAMER_INTERVAL_S": "2"},
    )
    wait_until(lambda: sample_count(database_url) > 0, timeout_s=60, what="the first stored sample")

    temporary_postgres.stop()
    time.sleep(5)
    temporary_postgres.start()

    before = sample_count(database_url)
    wait_until(
        lambda: sample_count(database_url) > before, timeout_s=60, what="ingest after the outage"
    )
    wait_until(
        lambda: httpx.get(f"{stack.api_url}/readyz", timeout=5).status_code == 200,
        timeout_s=30,
        what="the API to be ready again",
    )
    reached = wait_for_more_passes(database_url, REAL_ROWS, 1)
    stop_streamers_and_drain(stack)
    assert_complete_passes(database_url, REAL_ROWS, min_passes=reached)
