"""Fixtures of the streamer tests: generated CSV dumps and an in-memory queue double."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from streamer_test_support import FakeQueue, StreamerProcess, write_dump


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    """A generated dump of 2 hosts x 4 GPUs x 10 metrics = 80 rows."""
    return write_dump(tmp_path / "small.csv", hosts=2, gpus_per_host=4)


@pytest.fixture
def fake_queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def streamers(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``streamers(queue_url, csv, **options)`` starts a streamer process; all are killed at teardown."""
    started: list[StreamerProcess] = []

    def start(queue_url: str, csv: Path, **options: Any) -> StreamerProcess:
        process = StreamerProcess(tmp_path / f"streamer-{len(started)}.log", queue_url, csv, **options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.cleanup()
