"""Fixtures of the collector tests: migrated databases and real records."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Engine

from streamer.dcgm_csv import ParsedRow, read_header, read_rows
from telemetry.database import make_engine
from telemetry.record import TelemetryRecord

ALEMBIC_INI = Path(__file__).resolve().parents[2] / "migrations" / "alembic.ini"


def _alembic_config(url: str) -> Config:
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("sqlalchemy.url", url)
    return config


@pytest.fixture(scope="session")
def alembic_config() -> Callable[[str], Config]:
    """Return a function that builds the project's Alembic configuration for a URL."""
    return _alembic_config


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """An SQLite and a PostgreSQL database upgraded to the newest migration."""
    command.upgrade(_alembic_config(database_url), "head")
    return database_url


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    engine = make_engine(migrated_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _records_from_csv(path: Path, *, run: str = "test", start: datetime | None = None) -> list[TelemetryRecord]:
    """Build one record per valid CSV row with the streamer's reader, with idempotency keys ``run:line``."""
    start = start or datetime(2026, 1, 1, tzinfo=UTC)
    return [
        row.stamp(processed_at=start + timedelta(microseconds=row.line), key=f"{run}:{row.line}")
        for row in read_rows(path, read_header(path))
        if isinstance(row, ParsedRow)
    ]


@pytest.fixture(scope="session")
def real_records(real_csv: Path) -> list[TelemetryRecord]:
    """The 2,470 rows of the real DCGM CSV as telemetry records."""
    return _records_from_csv(real_csv)


@pytest.fixture(scope="session")
def records_from_csv() -> Callable[..., list[TelemetryRecord]]:
    """Return a function that builds records from a CSV with keys ``run:line``."""
    return _records_from_csv


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def queue_url(start_queue_server: Callable[..., Any]) -> str:
    """URL of a real queue server process with its own data directory.

    The queue's own durability is not under test here, so it skips fsync.
    """
    return str(start_queue_server(QUEUE_FSYNC="never").url)
