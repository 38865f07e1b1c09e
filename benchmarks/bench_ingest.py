"""Ingest benchmark: the database's bare bulk insert rate against the collector's rate.

For each database (an SQLite file, and PostgreSQL when ``TEST_POSTGRES_URL`` is
set) the same rows are written three ways into a freshly migrated schema, with
the same tables and indexes:

1. ceiling: the driver's bulk path writes the samples alone (``sqlite3``
   ``executemany``, or PostgreSQL binary ``COPY`` straight into ``telemetry_samples``),
   1000 rows per transaction, with the GPUs and (GPU, metric) pairs inserted once
   beforehand. It is also measured with as many rows per transaction as the
   collector writes (``--transaction-rows``, the collector's default unless
   set), and as one transaction for all rows;
2. ``store_records``: the collector's storage function called directly, batches
   of 1000 (GPU upserts, metric pairs and the idempotent insert included), with a
   ``KnownGpus`` cache as the collector uses it;
3. collector: a real ``telemetry-collector`` process drains a real queue server
   pre-filled with the rows as messages, merging leased batches into transactions
   of up to ``--transaction-rows`` records, timed from the moment it logs its health
   port until the queue has acknowledged every message. The same is measured
   with two collector processes competing for the messages, as a deployment
   scales them out.

Once per run, the queue path alone is measured too: this process leases and
acknowledges the pre-filled messages with two lease requests in flight, as the
collector does, and neither validates nor stores them. It bounds what any
collector reaches with this queue server on this machine.

The SQLite ceiling uses the pragmas ``telemetry.database.make_engine`` sets (WAL,
``synchronous=NORMAL``, foreign keys on), so it checks the same foreign keys as
the collector's inserts.

Rows are the real DCGM CSV rows, repeated with distinct idempotency keys and
timestamps up to ``--rows``. Run with ``make bench-ingest``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import insert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collector.storage import POSTGRES_COPY_TYPES, KnownGpus, store_records
from collector.worker import CollectorConfig
from streamer.dcgm_csv import ParsedRow, read_header, read_rows
from telemetry.database import make_engine
from telemetry.queue_client import OutgoingMessage, QueueClient
from telemetry.record import TELEMETRY_QUEUE, TelemetryRecord
from telemetry.tables import Gpu, GpuMetric

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "dcgm_metrics_20250718_134233.csv"
BATCH = 1000


def build_records(csv_path: Path, total: int) -> list[TelemetryRecord]:
    """Repeat the CSV's valid rows, read with the streamer's reader, with distinct keys and timestamps until ``total`` records."""
    rows = [row for row in read_rows(csv_path, read_header(csv_path)) if isinstance(row, ParsedRow)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        rows[index % len(rows)].stamp(processed_at=start + timedelta(milliseconds=index), key=f"bench:{index}")
        for index in range(total)
    ]


def migrate(url: str) -> None:
    config = Config(str(ROOT / "migrations" / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    command.downgrade(config, "base")
    command.upgrade(config, "head")


def insert_metadata(url: str, records: Sequence[TelemetryRecord]) -> None:
    """Insert every GPU and (GPU, metric) pair once, so the ceiling writes samples alone."""
    gpus: dict[str, dict[str, Any]] = {}
    for record in records:
        gpus.setdefault(record.uuid, {
            "uuid": record.uuid, "hostname": record.hostname, "gpu_index": record.gpu_index,
            "device": record.device, "model_name": record.model_name,
            "first_seen": record.timestamp, "last_seen": record.timestamp,
        })
    pairs = sorted({(record.uuid, record.metric_name) for record in records})
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(insert(Gpu.__table__), list(gpus.values()))
        connection.execute(
            insert(GpuMetric.__table__),
            [{"gpu_uuid": gpu_uuid, "metric_name": name} for gpu_uuid, name in pairs],
        )
    engine.dispose()


def sample_tuple(record: TelemetryRecord, *, sqlite_text: bool) -> tuple[Any, ...]:
    def stamp(moment: datetime | None) -> Any:
        if moment is None or not sqlite_text:
            return moment
        return moment.replace(tzinfo=None).isoformat(" ", "microseconds")

    return (
        record.uuid,
        record.metric_name,
        record.value,
        stamp(record.timestamp),
        stamp(record.source_timestamp),
        orjson.dumps(record.labels).decode(),
        record.container,
        record.pod,
        record.namespace,
        record.key,
    )


COLUMNS = (
    'gpu_uuid, metric_name, value, "timestamp", source_timestamp, labels, '
    "container, pod, namespace, idempotency_key"
)


def ceiling_sqlite(path: Path, records: Sequence[TelemetryRecord], batch: int) -> float:
    rows = [sample_tuple(record, sqlite_text=True) for record in records]
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")
    sql = f"INSERT INTO telemetry_samples ({COLUMNS}) VALUES ({', '.join('?' * 10)})"
    started = time.perf_counter()
    for offset in range(0, len(rows), batch):
        connection.execute("BEGIN")
        connection.executemany(sql, rows[offset : offset + batch])
        connection.execute("COMMIT")
    elapsed = time.perf_counter() - started
    connection.close()
    return len(rows) / elapsed


def ceiling_postgres(url: str, records: Sequence[TelemetryRecord], batch: int) -> float:
    rows = [sample_tuple(record, sqlite_text=False) for record in records]
    with psycopg.connect(url) as connection:
        started = time.perf_counter()
        for offset in range(0, len(rows), batch):
            with connection.cursor() as cursor:
                with cursor.copy(f"COPY telemetry_samples ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(POSTGRES_COPY_TYPES)
                    for row in rows[offset : offset + batch]:
                        copy.write_row(row)
            connection.commit()
        elapsed = time.perf_counter() - started
    return len(rows) / elapsed


def store_rate(url: str, records: Sequence[TelemetryRecord]) -> float:
    engine = make_engine(url)
    known = KnownGpus()
    started = time.perf_counter()
    for offset in range(0, len(records), BATCH):
        store_records(engine, records[offset : offset + BATCH], known=known)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return len(records) / elapsed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def queue_server(work_dir: Path, fsync: str) -> Iterator[str]:
    port = free_port()
    log = (work_dir / "queue.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "queue_server", "--port", str(port), "--fsync", fsync,
         "--data-dir", str(work_dir / f"queue-{uuid.uuid4().hex[:8]}")],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/readyz"), 30)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


async def prefill(url: str, records: Sequence[TelemetryRecord]) -> None:
    async with QueueClient(url) as queue:
        await queue.create_queue(TELEMETRY_QUEUE, visibility_timeout_s=120)
        for offset in range(0, len(records), BATCH):
            chunk = records[offset : offset + BATCH]
            await queue.publish(
                TELEMETRY_QUEUE,
                [OutgoingMessage(body=record.to_body(), key=record.key) for record in chunk],
            )


async def drain_without_storing(url: str, total: int, concurrent_leases: int = 2) -> float:
    """Lease and ack ``total`` messages without validating or storing them; return the elapsed time."""
    async with QueueClient(url) as queue:
        acked = 0

        async def lease_and_ack() -> None:
            nonlocal acked
            while acked < total:
                messages = await queue.lease(TELEMETRY_QUEUE, max_messages=BATCH, wait_s=1)
                if messages:
                    await queue.ack(TELEMETRY_QUEUE, [message.receipt for message in messages])
                    acked += len(messages)

        started = time.perf_counter()
        await asyncio.gather(*(lease_and_ack() for _ in range(concurrent_leases)))
        return time.perf_counter() - started


def queue_only_rate(records: Sequence[TelemetryRecord], work_dir: Path, fsync: str) -> float:
    with queue_server(work_dir, fsync) as url:
        asyncio.run(prefill(url, records))
        elapsed = asyncio.run(drain_without_storing(url, len(records)))
    return len(records) / elapsed


def acked_total(url: str) -> int:
    response = httpx.get(f"{url}/v1/queues/{TELEMETRY_QUEUE}", timeout=5)
    return int(response.json()["stats"]["acked_total"])


def collector_rate(
    database_url: str,
    records: Sequence[TelemetryRecord],
    work_dir: Path,
    fsync: str,
    transaction_rows: int,
    processes: int = 1,
) -> float:
    with queue_server(work_dir, fsync) as url:
        asyncio.run(prefill(url, records))
        env = {**os.environ, "COLLECTOR_QUEUE_URLS": url, "DATABASE_URL": database_url,
               "COLLECTOR_PORT": "0", "COLLECTOR_WAIT_S": "1",
               "COLLECTOR_MAX_TRANSACTION_ROWS": str(transaction_rows)}
        started_collectors: list[subprocess.Popen[bytes]] = []
        log_paths = [work_dir / f"collector-{number}.log" for number in range(processes)]
        try:
            for log_path in log_paths:
                with log_path.open("wb") as log:
                    started_collectors.append(subprocess.Popen(
                        [sys.executable, "-m", "collector"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
                    ))
            # The clock starts once every process has imported its modules and
            # logged its health port, so interpreter start-up is not counted.
            for log_path in log_paths:
                wait_until(lambda path=log_path: "endpoints on" in path.read_text(), 60, interval_s=0.01)
            started = time.perf_counter()
            wait_until(lambda: acked_total(url) >= len(records), 1800, interval_s=0.1)
            elapsed = time.perf_counter() - started
        finally:
            for process in started_collectors:
                process.send_signal(signal.SIGTERM)
            for process in started_collectors:
                process.wait(timeout=60)
    return len(records) / elapsed


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def run_database(name: str, url: str, records: Sequence[TelemetryRecord], work_dir: Path,
                 fsync: str, sqlite_path: Path | None, transaction_rows: int) -> dict[str, float]:
    results: dict[str, float] = {}
    print(f"{name}: load average {load_average()} at start", flush=True)

    def ceiling(rows_per_transaction: int) -> float:
        migrate(url)
        insert_metadata(url, records)
        if sqlite_path is not None:
            return ceiling_sqlite(sqlite_path, records, rows_per_transaction)
        return ceiling_postgres(_libpq(url), records, rows_per_transaction)

    results["ceiling"] = ceiling(BATCH)
    results["ceiling_collector_transactions"] = ceiling(transaction_rows)
    results["ceiling_one_transaction"] = ceiling(len(records))

    migrate(url)
    results["store_records"] = store_rate(url, records)

    migrate(url)
    results["collector"] = collector_rate(url, records, work_dir, fsync, transaction_rows)

    migrate(url)
    results["two_collectors"] = collector_rate(
        url, records, work_dir, fsync, transaction_rows, processes=2
    )
    print(f"{name}: " + ", ".join(f"{key} {value:,.0f} rows/s" for key, value in results.items())
          + f"; load average {load_average()} at end", flush=True)
    return results


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def machine() -> str:
    def run(command: str) -> str:
        return subprocess.run(command, shell=True, capture_output=True, text=True).stdout.strip()

    return "\n".join([
        f"nproc: {run('nproc')}",
        run("lscpu | head -n 15"),
        run("free -h"),
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows per measurement")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="DCGM CSV to repeat")
    parser.add_argument("--queue-fsync", default="always", choices=["always", "interval", "never"],
                        help="fsync mode of the benchmark's queue server (default %(default)s)")
    parser.add_argument("--transaction-rows", type=int, default=CollectorConfig().max_transaction_rows,
                        help="the collectors' COLLECTOR_MAX_TRANSACTION_ROWS, and the rows per transaction "
                             "of the second ceiling (default %(default)s, the collector's default)")
    parser.add_argument("--postgres-url", default=os.environ.get("TEST_POSTGRES_URL", ""),
                        help="PostgreSQL server to create a scratch database in (TEST_POSTGRES_URL)")
    args = parser.parse_args(argv)

    records = build_records(args.csv, args.rows)
    print(machine(), flush=True)
    print(f"\n{len(records):,} rows, batches of {BATCH}, collector transactions of up to "
          f"{args.transaction_rows} rows, queue fsync {args.queue_fsync}\n", flush=True)
    table: list[tuple[str, dict[str, float]]] = []

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as temp:
        work_dir = Path(temp)
        queue_only = queue_only_rate(records, work_dir, args.queue_fsync)
        print(f"queue path alone (lease + ack, no validation, no database): "
              f"{queue_only:,.0f} messages/s; load average {load_average()}", flush=True)
        sqlite_path = work_dir / "telemetry.db"
        table.append(("SQLite (WAL)", run_database(
            "SQLite", f"sqlite:///{sqlite_path}", records, work_dir, args.queue_fsync, sqlite_path,
            args.transaction_rows)))

        if args.postgres_url:
            database = f"bench_ingest_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(args.postgres_url, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{database}"')
            try:
                base = args.postgres_url.rsplit("/", 1)[0]
                table.append(("PostgreSQL", run_database(
                    "PostgreSQL", f"{base}/{database}", records, work_dir, args.queue_fsync, None,
                    args.transaction_rows)))
            finally:
                with psycopg.connect(args.postgres_url, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        else:
            print("TEST_POSTGRES_URL is not set: PostgreSQL skipped", flush=True)

    # The target compares the collector with the ceiling at 1000 rows per
    # transaction, one lease batch. The collector merges batches into larger
    # transactions, so the last column compares it with the ceiling at its own size.
    print(f"\n| database | ceiling (rows/s, 1000 per tx) | ceiling, {args.transaction_rows} per tx | "
          "ceiling, one tx | store_records | collector | 2 collectors | queue path alone | "
          "collector / ceiling | 2 collectors / ceiling | store_records / ceiling | queue path / ceiling | "
          f"collector / ceiling at {args.transaction_rows} per tx |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, result in table:
        ceiling = result["ceiling"]
        print(
            f"| {name} | {ceiling:,.0f} | {result['ceiling_collector_transactions']:,.0f} | "
            f"{result['ceiling_one_transaction']:,.0f} | "
            f"{result['store_records']:,.0f} | {result['collector']:,.0f} | {result['two_collectors']:,.0f} | "
            f"{queue_only:,.0f} | {result['collector'] / ceiling:.0%} | {result['two_collectors'] / ceiling:.0%} | "
            f"{result['store_records'] / ceiling:.0%} | {queue_only / ceiling:.0%} | "
            f"{result['collector'] / result['ceiling_collector_transactions']:.0%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
