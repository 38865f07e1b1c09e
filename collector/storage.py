"""Idempotent bulk storage of telemetry records, shared by every way records arrive.

``store_records`` writes one batch in one transaction:

1. upserts each GPU of the batch (``first_seen`` and ``last_seen`` only widen, and
   the descriptive columns follow the newest sample);
2. inserts each (GPU, metric name) pair into ``gpu_metrics`` unless present;
3. inserts the samples with ``ON CONFLICT (idempotency_key) DO NOTHING``, so a
   redelivered message is stored once and counted as a duplicate.

A long-running writer passes a ``KnownGpus`` cache, which remembers what its own
commits wrote. Steps 1 and 2 then skip the GPUs whose stored time range already
covers the batch and the (GPU, metric name) pairs already stored.

Samples take a bulk path. On SQLite they go in multi-row ``INSERT ... VALUES``
statements of ``SQLITE_ROWS_PER_STATEMENT`` rows each and one ``executemany`` for
the rest (the comment above that constant explains why). On PostgreSQL they go
in a binary ``COPY`` straight into ``telemetry_samples`` inside a savepoint, and,
only when that batch contains an already stored key, a binary ``COPY`` into a
temporary table followed by one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``.
Rows are written in key order (GPUs by uuid, samples by idempotency key), so
concurrent writers on PostgreSQL take row locks in the same order and do not
deadlock each other.

The function is synchronous; async callers run it in a worker thread.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from sqlalchemy import Table, case, column, select, table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from telemetry.record import AnyRecord, labels_json
from telemetry.tables import Gpu, GpuMetric, TelemetrySample

__all__ = ["KnownGpus", "StoreResult", "store_records"]

GPUS: Table = Gpu.__table__  # type: ignore[attr-defined]
GPU_METRICS: Table = GpuMetric.__table__  # type: ignore[attr-defined]
SAMPLES: Table = TelemetrySample.__table__  # type: ignore[attr-defined]

#: Sample columns written by the collector, in the order of the bulk rows.
SAMPLE_COLUMNS = (
    "gpu_uuid",
    "metric_name",
    "value",
    "timestamp",
    "source_timestamp",
    "labels",
    "container",
    "pod",
    "namespace",
    "idempotency_key",
)

#: Session-local staging table for PostgreSQL COPY, emptied at every commit.
STAGING_TABLE = "incoming_telemetry_samples"

_STAGING = table(STAGING_TABLE, *(column(name) for name in SAMPLE_COLUMNS))

_POSTGRES_CREATE_STAGING = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} "
    "(gpu_uuid varchar(128), metric_name varchar(128), value double precision, "
    '"timestamp" timestamptz, source_timestamp timestamptz, labels json, '
    "container varchar(255), pod varchar(255), namespace varchar(255), "
    "idempotency_key varchar(255)) ON COMMIT DELETE ROWS"
)
_COPY_COLUMNS = ", ".join(f'"{name}"' if name == "timestamp" else name for name in SAMPLE_COLUMNS)
_POSTGRES_COPY = f"COPY {STAGING_TABLE} ({_COPY_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_POSTGRES_COPY_DIRECT = f"COPY {SAMPLES.name} ({_COPY_COLUMNS}) FROM STDIN (FORMAT BINARY)"

#: Binary COPY types of the sample columns, in ``SAMPLE_COLUMNS`` order. Binary
#: COPY took psycopg 1.8 µs of CPU per row against 3.8 µs for text COPY (ad-hoc
#: timing), and the server reads the timestamps without parsing text. The labels
#: go as text, which PostgreSQL's json input parses, because psycopg's json type
#: would send a ``str`` as a JSON string, not an object.
POSTGRES_COPY_TYPES = (
    "text", "text", "float8", "timestamptz", "timestamptz", "text", "text", "text", "text", "text"
)


@dataclass(frozen=True, slots=True)
class StoreResult:
    """Outcome of one ``store_records`` call.

    ``stored`` samples were new; ``duplicates`` had an idempotency key that was
    already in the database (or earlier in the same batch) and were skipped.
    """

    stored: int
    duplicates: int


class KnownGpus:
    """Cache of the rows that this process's own commits stored in ``gpus`` and ``gpu_metrics``.

    Stored GPU time ranges only widen, whichever process writes them, so a range
    this process committed lies within the stored one: a GPU whose batch
    range falls inside it needs no upsert. A stored (GPU, metric name) pair needs
    no insert. The cache is updated only after a commit, and ``store_records``
    clears it and retries once when the database rejects a batch, which is what
    happens when cached GPUs were deleted behind its back (the samples' foreign
    key fails).

    One instance belongs to one database; it is not thread-safe, so one writer
    thread uses it at a time.
    """

    def __init__(self) -> None:
        self._ranges: dict[str, tuple[datetime, datetime, tuple[Any, ...]]] = {}
        self._pairs: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        return len(self._ranges)

    def clear(self) -> None:
        """Forget everything, so the next batch upserts all of its GPUs and pairs."""
        self._ranges.clear()
        self._pairs.clear()

    def covers(self, row: dict[str, Any]) -> bool:
        """Return whether the stored row of this GPU needs no change for ``row``."""
        known = self._ranges.get(row["uuid"])
        if known is None:
            return False
        first_seen, last_seen, descriptive = known
        if row["first_seen"] < first_seen or row["last_seen"] > last_seen:
            return False
        # At an equal last_seen the upsert copies the incoming descriptive columns.
        return row["last_seen"] < last_seen or _descriptive(row) == descriptive

    def new_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Return the pairs not known to be stored, in the given order."""
        return [pair for pair in pairs if pair not in self._pairs]

    def remember(self, gpus: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]]) -> None:
        """Record GPU rows and pairs that a committed transaction wrote."""
        for row in gpus:
            known = self._ranges.get(row["uuid"])
            if known is None:
                self._ranges[row["uuid"]] = (row["first_seen"], row["last_seen"], _descriptive(row))
                continue
            first_seen, last_seen, descriptive = known
            if row["last_seen"] >= last_seen:
                last_seen, descriptive = row["last_seen"], _descriptive(row)
            self._ranges[row["uuid"]] = (min(first_seen, row["first_seen"]), last_seen, descriptive)
        self._pairs.update(pairs)


def _descriptive(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["hostname"], row["gpu_index"], row["device"], row["model_name"])


def store_records(
    engine: Engine, records: Sequence[AnyRecord], *, known: KnownGpus | None = None
) -> StoreResult:
    """Store a batch of records in one transaction, ignoring already stored keys.

    Either the whole batch is committed or nothing is. ``known`` is the caller's
    cache of stored GPUs and pairs, updated after the commit. Without it, every
    GPU and pair of the batch is upserted. Database errors propagate as
    SQLAlchemy exceptions (``OperationalError`` when the database is unreachable or
    locked, ``DataError`` or ``IntegrityError`` when it rejects a value), so the
    caller decides whether to retry.
    """
    if not records:
        return StoreResult(stored=0, duplicates=0)

    ordered = sorted(records, key=_record_key)
    gpus = _gpu_rows(ordered)
    pairs = sorted({(record.uuid, record.metric_name) for record in ordered})
    if known is None:
        stored = _store_once(engine, gpus, pairs, ordered)
        return StoreResult(stored=stored, duplicates=len(records) - stored)

    try:
        stored = _store_once(
            engine,
            [row for row in gpus if not known.covers(row)],
            known.new_pairs(pairs),
            ordered,
        )
    except (DataError, IntegrityError):
        if not known:
            raise
        # The cache may be stale because rows were deleted or the database was
        # restored. A rejection that remains without the cache is the data's fault.
        known.clear()
        stored = _store_once(engine, gpus, pairs, ordered)
    known.remember(gpus, pairs)
    return StoreResult(stored=stored, duplicates=len(records) - stored)


def _store_once(
    engine: Engine,
    gpus: list[dict[str, Any]],
    pairs: list[tuple[str, str]],
    records: Sequence[AnyRecord],
) -> int:
    with engine.begin() as connection:
        dialect_name = connection.dialect.name
        if dialect_name == "postgresql":
            return _store_postgres(connection, gpus, pairs, records)
        if dialect_name == "sqlite":
            return _store_sqlite(connection, gpus, pairs, records)
        raise ValueError(
            f"unsupported database dialect {dialect_name!r}: expected sqlite or postgresql"
        )


def _gpu_rows(records: Sequence[AnyRecord]) -> list[dict[str, Any]]:
    """Return one row per GPU: the newest record's fields and the batch's time range."""
    newest: dict[str, AnyRecord] = {}
    first_seen: dict[str, datetime] = {}
    for record in records:
        current = newest.get(record.uuid)
        if current is None or record.timestamp >= current.timestamp:
            newest[record.uuid] = record
        earliest = first_seen.get(record.uuid)
        if earliest is None or record.timestamp < earliest:
            first_seen[record.uuid] = record.timestamp

    return [
        {
            "uuid": uuid,
            "hostname": newest[uuid].hostname,
            "gpu_index": newest[uuid].gpu_index,
            "device": newest[uuid].device,
            "model_name": newest[uuid].model_name,
            "first_seen": first_seen[uuid],
            "last_seen": newest[uuid].timestamp,
        }
        for uuid in sorted(newest)
    ]


def _gpu_upsert(insert: Any) -> Any:
    """Complete a dialect's ``INSERT INTO gpus`` into the upsert that widens the seen range."""
    incoming = insert.excluded
    is_newer = incoming.last_seen >= GPUS.c.last_seen
    return insert.on_conflict_do_update(
        index_elements=[GPUS.c.uuid],
        set_={
            "hostname": case((is_newer, incoming.hostname), else_=GPUS.c.hostname),
            "gpu_index": case((is_newer, incoming.gpu_index), else_=GPUS.c.gpu_index),
            "device": case((is_newer, incoming.device), else_=GPUS.c.device),
            "model_name": case((is_newer, incoming.model_name), else_=GPUS.c.model_name),
            "first_seen": case(
                (incoming.first_seen < GPUS.c.first_seen, incoming.first_seen),
                else_=GPUS.c.first_seen,
            ),
            "last_seen": case((is_newer, incoming.last_seen), else_=GPUS.c.last_seen),
        },
    )


# SQLite: the Core statements are compiled once to plain SQL with positional
# parameters and run on tuples through the driver. That skips SQLAlchemy's per-row
# parameter processing, which costs more than the inserts.
#
# sqlite3 releases the GIL while SQLite runs a statement, and an executemany takes
# it back after every row. The collector's event loop holds the GIL for milliseconds
# while it decodes a lease response, so those rows waited and the two threads took
# turns. A 2000-row statement takes the GIL back once: a collector process drained
# 100,000 rows about 8 % faster (ad-hoc, interleaved runs). Multi-row statements of
# 128 to 512 rows cost up to a third more CPU per row than executemany on the
# samples table, so the rows that do not fill a whole statement keep executemany.

#: Rows per multi-row INSERT on SQLite, fewer when the library allows fewer
#: parameters. A batch's remaining rows, fewer than this, go through executemany.
SQLITE_ROWS_PER_STATEMENT = 2000


@dataclass(frozen=True, slots=True)
class _CompiledInsert:
    sql: str
    columns: tuple[str, ...]


def _compile_sqlite(statement: Any, columns: Sequence[str]) -> _CompiledInsert:
    compiled = statement.compile(
        dialect=sqlite.dialect(paramstyle="qmark"), column_keys=list(columns)
    )
    return _CompiledInsert(sql=compiled.string, columns=tuple(compiled.positiontup or ()))


@functools.cache
def _sqlite_statements() -> tuple[_CompiledInsert, _CompiledInsert, _CompiledInsert]:
    gpu_columns = [column.name for column in GPUS.columns]
    gpus = _compile_sqlite(_gpu_upsert(sqlite.insert(GPUS)), gpu_columns)
    metrics = _compile_sqlite(
        sqlite.insert(GPU_METRICS).on_conflict_do_nothing(), ["gpu_uuid", "metric_name"]
    )
    samples = _compile_sqlite(
        sqlite.insert(SAMPLES).on_conflict_do_nothing(index_elements=["idempotency_key"]),
        SAMPLE_COLUMNS,
    )
    if samples.columns != SAMPLE_COLUMNS or metrics.columns != ("gpu_uuid", "metric_name"):
        raise RuntimeError(f"unexpected parameter order in {samples.sql!r} or {metrics.sql!r}")
    return gpus, metrics, samples


def _store_sqlite(
    connection: Connection,
    gpus: list[dict[str, Any]],
    pairs: list[tuple[str, str]],
    records: Sequence[AnyRecord],
) -> int:
    gpu_upsert, metric_insert, sample_insert = _sqlite_statements()

    if gpus:
        timestamps = {"first_seen", "last_seen"}
        _insert_sqlite(
            connection,
            gpu_upsert,
            [
                tuple(
                    _sqlite_timestamp(row[name]) if name in timestamps else row[name]
                    for name in gpu_upsert.columns
                )
                for row in gpus
            ],
        )
    if pairs:
        _insert_sqlite(connection, metric_insert, pairs)

    stamps = _sqlite_timestamps([record.timestamp for record in records])
    sources = _sqlite_timestamps([record.source_timestamp for record in records])
    rows = [
        (
            record.uuid,
            record.metric_name,
            record.value,
            stamp,
            source,
            labels_json(record),
            record.container,
            record.pod,
            record.namespace,
            record.key,
        )
        for record, stamp, source in zip(records, stamps, sources, strict=True)
    ]
    return _insert_sqlite(connection, sample_insert, rows)


def _sqlite_timestamps(moments: list[datetime | None]) -> list[str | None]:
    """Return ``_sqlite_timestamp`` of each moment, for a whole batch at a time.

    ``datetime.isoformat`` of an aware datetime costs about 1 µs, two per sample.
    msgspec formats a list of them in C, in RFC 3339 (``2026-01-02T03:04:05.000006Z``,
    or ``2026-01-02T03:04:05Z`` on a whole second), and cutting that text costs a
    fifth as much. A text of another shape (an offset other than UTC) takes
    ``_sqlite_timestamp``.
    """
    texts = msgspec.to_builtins(moments)
    formatted: list[str | None] = []
    for text, moment in zip(texts, moments, strict=True):
        if text is None:
            formatted.append(None)
        elif len(text) == 27 and text[26] == "Z" and text[19] == ".":
            formatted.append(text[:10] + " " + text[11:26])
        elif len(text) == 20 and text[19] == "Z":
            formatted.append(text[:10] + " " + text[11:19] + ".000000")
        else:
            formatted.append(_sqlite_timestamp(moment))
    return formatted


def _insert_sqlite(
    connection: Connection, insert: _CompiledInsert, rows: Sequence[tuple[Any, ...]]
) -> int:
    """Run ``insert`` for every row, many rows per statement, and return the number of rows changed."""
    driver_connection: Any = connection.connection.driver_connection
    width = len(insert.columns)
    parameter_limit = driver_connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    per_statement = max(1, min(SQLITE_ROWS_PER_STATEMENT, parameter_limit // width))
    full = len(rows) - len(rows) % per_statement
    changed = 0
    if full:
        sql = _multi_row_sql(insert.sql, width, per_statement)
        for start in range(0, full, per_statement):
            parameters = tuple(itertools.chain.from_iterable(rows[start : start + per_statement]))
            changed += int(connection.exec_driver_sql(sql, parameters).rowcount)
    if full < len(rows):
        changed += int(connection.exec_driver_sql(insert.sql, list(rows[full:])).rowcount)
    return changed


@functools.lru_cache(maxsize=64)
def _multi_row_sql(sql: str, width: int, rows: int) -> str:
    """Return ``sql``, an INSERT with one VALUES row of ``width`` parameters, with ``rows`` rows."""
    one_row = "(" + ", ".join("?" * width) + ")"
    head, found, tail = sql.partition(f"VALUES {one_row}")
    if not found:
        raise RuntimeError(f"no VALUES clause of {width} parameters in {sql!r}")
    return f"{head}VALUES {', '.join([one_row] * rows)}{tail}"


# PostgreSQL: samples are copied straight into the table. A batch with a stored
# key is copied into a session-local staging table instead, then moved with one
# INSERT ... SELECT ... ON CONFLICT DO NOTHING.

_POSTGRES_GPU_UPSERT = _gpu_upsert(postgresql.insert(GPUS))
_POSTGRES_METRIC_INSERT = postgresql.insert(GPU_METRICS).on_conflict_do_nothing()
_POSTGRES_SAMPLE_INSERT = (
    postgresql.insert(SAMPLES)
    .from_select(
        list(SAMPLE_COLUMNS),
        select(*(_STAGING.c[name] for name in SAMPLE_COLUMNS)).order_by(
            _STAGING.c.idempotency_key
        ),
    )
    .on_conflict_do_nothing(index_elements=["idempotency_key"])
    .execution_options(preserve_rowcount=True)
)


def _store_postgres(
    connection: Connection,
    gpus: list[dict[str, Any]],
    pairs: list[tuple[str, str]],
    records: Sequence[AnyRecord],
) -> int:
    if gpus:
        connection.execute(_POSTGRES_GPU_UPSERT, gpus)
    if pairs:
        connection.execute(
            _POSTGRES_METRIC_INSERT,
            [{"gpu_uuid": gpu_uuid, "metric_name": name} for gpu_uuid, name in pairs],
        )

    # Redeliveries are rare, so the plain COPY usually succeeds. A unique key
    # violation rolls back to the savepoint and the batch takes the staging path.
    # Any other integrity error reaches the caller.
    try:
        with connection.begin_nested():
            _copy_rows(connection, _POSTGRES_COPY_DIRECT, records)
        return len(records)
    except IntegrityError as exc:
        if not isinstance(exc.orig, psycopg.errors.UniqueViolation):
            raise

    # Created in every transaction (a no-op once it exists), because a rolled-back
    # transaction also rolls back the creation of the session's temporary table.
    connection.exec_driver_sql(_POSTGRES_CREATE_STAGING)
    _copy_rows(connection, _POSTGRES_COPY, records)

    result = connection.execute(_POSTGRES_SAMPLE_INSERT)
    return int(result.rowcount)


def _copy_rows(connection: Connection, statement: str, records: Sequence[AnyRecord]) -> None:
    # COPY has no SQLAlchemy API, so this talks to psycopg directly and translates
    # its errors into SQLAlchemy's, as the other statements raise. The staging
    # table is emptied at commit (ON COMMIT DELETE ROWS) and a rollback discards
    # the copied rows too, so nothing carries over to the next batch.
    driver_connection: Any = connection.connection.driver_connection
    try:
        with driver_connection.cursor() as cursor:
            with cursor.copy(statement) as copy:
                copy.set_types(POSTGRES_COPY_TYPES)
                for record in records:
                    copy.write_row(
                        (
                            record.uuid,
                            record.metric_name,
                            record.value,
                            record.timestamp,
                            record.source_timestamp,
                            labels_json(record),
                            record.container,
                            record.pod,
                            record.namespace,
                            record.key,
                        )
                    )
    except psycopg.Error as exc:
        broken = bool(driver_connection.broken)
        if broken:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            statement, None, exc, psycopg.Error, connection_invalidated=broken
        ) from exc


def _record_key(record: AnyRecord) -> str:
    return record.key


def _sqlite_timestamp(moment: datetime | None) -> str | None:
    # The text form SQLAlchemy's SQLite DateTime type writes and reads: naive UTC,
    # fixed width, so text order is time order.
    if moment is None:
        return None
    if moment.utcoffset():
        moment = moment.astimezone(UTC)
    return moment.replace(tzinfo=None).isoformat(" ", "microseconds")
