"""Engine creation for the telemetry database, SQLite or PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlmodel import create_engine

from telemetry.tables import Gpu, GpuMetric, TelemetrySample

__all__ = ["DEFAULT_DATABASE_URL", "TELEMETRY_TABLES", "database_url_from_env", "make_engine", "missing_tables"]

#: The embedded default: an SQLite file under the project's data directory.
DEFAULT_DATABASE_URL = "sqlite:///data/telemetry.db"

#: Tables that the migrations create and the collector and API need.
TELEMETRY_TABLES: tuple[str, ...] = tuple(
    model.__tablename__ for model in (Gpu, GpuMetric, TelemetrySample)  # type: ignore[misc]
)

#: How long an SQLite connection waits for a writer's lock before failing, in ms.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def database_url_from_env(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    """Return ``DATABASE_URL`` from the environment, or the SQLite default."""
    environ = os.environ if environ is None else environ
    return environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def missing_tables(connection: Connection) -> list[str]:
    """Return the names of the ``TELEMETRY_TABLES`` that the connected database lacks.

    An empty list means the schema is migrated. Connection errors propagate.
    """
    inspector = inspect(connection)
    return [name for name in TELEMETRY_TABLES if not inspector.has_table(name)]


def make_engine(
    url: str,
    *,
    sqlite_busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
    create_parent_dir: bool = True,
    **kwargs: Any,
) -> Engine:
    """Create an engine; SQLite gets WAL mode, a busy timeout and foreign keys.

    A ``postgresql://`` URL is run on psycopg 3. The parent folder of an SQLite
    file is created if missing, unless ``create_parent_dir`` is false (readers pass
    false, so a missing folder fails at connect time). ``sqlite_busy_timeout_ms`` is
    how long an SQLite statement waits for another writer's lock before it fails
    with "database is locked".
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if create_parent_dir and parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", sqlite_busy_timeout_ms / 1000)
    else:
        kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_configurator(sqlite_busy_timeout_ms))
    return engine


def _sqlite_configurator(busy_timeout_ms: int) -> Any:
    def configure(dbapi_connection: Any, connection_record: Any) -> None:
        _configure_sqlite(dbapi_connection, connection_record, busy_timeout_ms=busy_timeout_ms)

    return configure


def _configure_sqlite(
    dbapi_connection: Any, _record: Any, *, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS
) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
