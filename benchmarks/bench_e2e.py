"""End-to-end benchmark: CSV rows to stored samples, and freshness through the API.

1. Throughput. The whole stack (circus with circus.ini, as ``make run`` starts it)
   on the real DCGM CSV with ``STREAMER_INTERVAL_S=0``, for 1, 2 and 4 streamers
   and as many collectors, into a fresh SQLite file. The rate is stored samples
   per second from the moment every streamer and collector has started (logged
   its endpoints) to the last stored sample, so the start-up of the processes,
   which share the cores, is not counted. In the same run, the
   database's bare bulk-insert ceiling for the same number of rows
   (``bench_ingest.ceiling_sqlite``: ``sqlite3`` ``executemany`` into the same
   tables and indexes, 1000 rows per transaction).
2. Freshness. The stack at the default pace (one pass per second, 2 streamers,
   2 collectors). Every ``--poll-s`` seconds a poller requests the new samples of
   a few GPUs from the API and records, per sample, the time between the sample's
   processed timestamp and the moment the API first returned it. The poll interval adds up
   to one interval to each figure.

Run with ``make bench-e2e``; the results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy.engine import Connection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "system"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_ingest import build_records, ceiling_sqlite, insert_metadata, machine, migrate  # noqa: E402
from system_stack import Stack, wait_until  # noqa: E402

from telemetry.database import make_engine  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "dcgm_metrics_20250718_134233.csv"
ROWS_PER_PASS = 2470
#: Log lines of a streamer and of a collector that has imported its modules and serves its endpoints.
STREAMER_STARTED = "; health and metrics on http://"
COLLECTOR_STARTED = "health and metrics endpoints on http://"


def stored(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM telemetry_samples").scalar_one())
    finally:
        engine.dispose()


def highest_sample_id(connection: Connection) -> int:
    """Return the highest sample id, which equals the number of stored samples here.

    SQLite gives each new row the highest id plus one, and nothing deletes samples
    or skips ids during the run (duplicates are not inserted and a rolled-back
    transaction frees its ids). An index lookup instead of a count keeps the
    poller's CPU away from the processes it measures.
    """
    return int(connection.exec_driver_sql("SELECT coalesce(max(id), 0) FROM telemetry_samples").scalar_one())


def throughput(csv: Path, work_dir: Path, processes: int, passes: int) -> float:
    """Return stored samples per second for ``processes`` streamers and collectors."""
    database_url = f"sqlite:///{work_dir / 'telemetry.db'}"
    stack = Stack(
        data_dir=work_dir / "stack",
        database_url=database_url,
        csv=csv,
        streamers=processes,
        collectors=processes,
        extra_env={
            "STREAMER_INTERVAL_S": "0",
            "STREAMER_PASSES": str(passes),
            "STREAMER_RESPAWN": "false",
            "QUEUE_LOG_LEVEL": "WARNING",
        },
    )
    total = passes * ROWS_PER_PASS
    try:
        stack.start()
        # Streaming begins while later processes still import their modules, on the
        # same cores, so the clock starts once every streamer and collector is up.
        wait_until(lambda: _started(stack.log(), processes), timeout_s=120, what="every streamer and collector to start")
        engine = make_engine(database_url)
        try:
            with engine.connect() as connection:
                first_count, first_at = highest_sample_id(connection), time.monotonic()
                deadline = first_at + 600
                while time.monotonic() < deadline:
                    count = highest_sample_id(connection)
                    now = time.monotonic()
                    if count >= total:
                        break
                    time.sleep(0.1)
                else:
                    raise TimeoutError(f"{total} samples not stored within 600 s")
        finally:
            engine.dispose()
        counted = stored(database_url)
        if counted != count:
            raise RuntimeError(f"{counted} samples stored, but the highest sample id is {count}")
        return (count - first_count) / (now - first_at)
    finally:
        stack.stop()


def _started(log: str, processes: int) -> bool:
    """Return whether ``log`` shows ``processes`` streamers and as many collectors serving their endpoints."""
    return (
        log.count(STREAMER_STARTED) >= processes
        and log.count(COLLECTOR_STARTED) >= processes
    )


def ceiling(csv: Path, work_dir: Path, rows: int) -> float:
    path = work_dir / "ceiling.db"
    url = f"sqlite:///{path}"
    records = build_records(csv, rows)
    migrate(url)
    insert_metadata(url, records)
    return ceiling_sqlite(path, records, 1000)


def freshness(csv: Path, work_dir: Path, duration_s: float, poll_s: float) -> list[float]:
    """Return the seconds from processed timestamp to the first API response with it, per sample."""
    database_url = f"sqlite:///{work_dir / 'telemetry.db'}"
    stack = Stack(data_dir=work_dir / "stack", database_url=database_url, csv=csv, streamers=2, collectors=2)
    latencies: list[float] = []
    try:
        stack.start()
        with httpx.Client(base_url=stack.api_url, timeout=10) as client:
            while not client.get("/api/v1/gpus").json()["items"]:
                time.sleep(0.2)
            gpus = [gpu["id"] for gpu in client.get("/api/v1/gpus").json()["items"]][::50]
            since = {gpu: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for gpu in gpus}
            seen: set[int] = set()
            end = time.monotonic() + duration_s
            while time.monotonic() < end:
                for gpu in gpus:
                    page = client.get(
                        f"/api/v1/gpus/{gpu}/telemetry",
                        params={"start_time": since[gpu], "limit": 10000},
                    ).json()
                    answered = datetime.now(UTC)
                    for item in page["items"]:
                        if item["id"] in seen:
                            continue
                        seen.add(item["id"])
                        stamp = datetime.fromisoformat(item["timestamp"].replace("Z", "+00:00"))
                        latencies.append((answered - stamp).total_seconds())
                        since[gpu] = max(since[gpu], item["timestamp"])
                time.sleep(poll_s)
    finally:
        stack.stop()
    return latencies


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="DCGM CSV to stream")
    parser.add_argument("--passes", type=int, default=200, help="passes over the CSV per throughput run (default %(default)s)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4],
                        help="streamer and collector counts to measure")
    parser.add_argument("--freshness-s", type=float, default=30.0, help="length of the freshness run, in seconds")
    parser.add_argument("--poll-s", type=float, default=0.1, help="API poll interval of the freshness run, in seconds")
    args = parser.parse_args(argv)

    print(machine())
    rows = args.passes * ROWS_PER_PASS
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(tmp)
        (work / "ceiling").mkdir()
        ceiling_rate = ceiling(args.csv, work / "ceiling", rows)
        print(f"SQLite bulk-insert ceiling, {rows} rows: {ceiling_rate:,.0f} rows/s")
        for count in args.processes:
            run_dir = work / f"e2e-{count}"
            run_dir.mkdir()
            rate = throughput(args.csv, run_dir, count, args.passes)
            print(
                f"{count} streamers + {count} collectors, {rows} rows: {rate:,.0f} rows/s "
                f"= {rate / ceiling_rate:.2f} of the ceiling"
            )
        fresh_dir = work / "freshness"
        fresh_dir.mkdir()
        latencies = freshness(args.csv, fresh_dir, args.freshness_s, args.poll_s)
    if not latencies:
        print("freshness: no samples observed")
        return 1
    print(
        f"freshness over {len(latencies)} samples: p50 {statistics.median(latencies):.3f} s, "
        f"p99 {percentile(latencies, 0.99):.3f} s, max {max(latencies):.3f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
