"""Benchmark: one 1000-sample page of one GPU's telemetry, HTTP API against a direct query.

The database is an SQLite file with 10 million samples of 256 GPUs (10 metrics
every 10 s, about 10.8 hours), built once with raw ``sqlite3`` bulk inserts and
reused from the cache folder. The benchmark starts the real server
(``python -m api``, granian, one worker) on a free loopback port and times, in
alternating rounds:

- ``api``: ``GET /api/v1/gpus/{id}/telemetry`` for a one-hour window with
  ``limit=1000`` over HTTP/1.1 keep-alive, until the whole body is received;
- ``direct``: the same statement (``api.queries.telemetry_page_statement``,
  1001 rows, as the API requests) run through SQLAlchemy on an engine in this
  process, rows fetched. This is the ceiling the API is compared against.

Every round uses the same seeded list of (GPU, window start) pairs for both.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.queries import fetch_telemetry_page, telemetry_page_statement
from telemetry.database import make_engine
from telemetry.tables import metadata

GPU_COUNT = 256
METRIC_NAMES = (
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_ENC_UTIL",
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
)
TICK_S = 10
START = datetime(2025, 7, 18, 0, 0, 0, tzinfo=UTC)
PAGE_LIMIT = 1000
WINDOW = timedelta(hours=1)
#: Kept small so 10 million rows stay within a few GB.
LABELS_JSON = '{"job":"dcgm"}'
START_TIMEOUT_S = 30.0


def gpu_uuid(index: int) -> str:
    return f"GPU-{index:08x}-0000-4000-8000-000000000000"


def build_database(path: Path, samples: int) -> None:
    """Create the schema with SQLAlchemy, then bulk-insert ``samples`` rows with sqlite3."""
    tmp_path = path.with_suffix(".tmp")
    for leftover in (tmp_path, Path(f"{tmp_path}-wal"), Path(f"{tmp_path}-shm")):
        leftover.unlink(missing_ok=True)
    engine = make_engine(f"sqlite:///{tmp_path}")
    metadata.create_all(engine)
    engine.dispose()

    ticks = -(-samples // (GPU_COUNT * len(METRIC_NAMES)))
    end = START + timedelta(seconds=TICK_S * (ticks - 1))
    connection = sqlite3.connect(tmp_path)
    connection.execute("PRAGMA journal_mode=OFF")
    connection.execute("PRAGMA synchronous=OFF")
    connection.executemany(
        "INSERT INTO gpus (uuid, hostname, gpu_index, device, model_name, first_seen, last_seen) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                gpu_uuid(g),
                f"bench-host-{g // 8:03d}",
                g % 8,
                f"nvidia{g % 8}",
                "NVIDIA H100 80GB HBM3",
                _sqlite_text(START),
                _sqlite_text(end),
            )
            for g in range(GPU_COUNT)
        ],
    )
    connection.executemany(
        "INSERT INTO gpu_metrics (gpu_uuid, metric_name) VALUES (?, ?)",
        [(gpu_uuid(g), name) for g in range(GPU_COUNT) for name in METRIC_NAMES],
    )

    def rows():  # type: ignore[no-untyped-def]
        number = 0
        for tick in range(ticks):
            stamp = _sqlite_text(START + timedelta(seconds=TICK_S * tick))
            for g in range(GPU_COUNT):
                uuid = gpu_uuid(g)
                for m, name in enumerate(METRIC_NAMES):
                    if number >= samples:
                        return
                    yield (
                        uuid,
                        name,
                        float((tick + g + m) % 100),
                        stamp,
                        LABELS_JSON,
                        f"b{number:09d}",
                    )
                    number += 1

    started = time.perf_counter()
    connection.executemany(
        "INSERT INTO telemetry_samples (gpu_uuid, metric_name, value, timestamp, labels, idempotency_key) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        rows(),
    )
    connection.commit()
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("ANALYZE")
    connection.close()
    tmp_path.rename(path)
    print(
        f"built {path} with {samples:,} samples in {time.perf_counter() - started:.0f} s",
        flush=True,
    )


def _sqlite_text(moment: datetime) -> str:
    # The text form SQLAlchemy's SQLite DateTime type stores: naive UTC, fixed width.
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass(frozen=True)
class Query:
    gpu: str
    start: datetime

    @property
    def end(self) -> datetime:
        return self.start + WINDOW

    def params(self) -> dict[str, object]:
        return {
            "start_time": self.start.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end_time": self.end.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "limit": PAGE_LIMIT,
        }


def make_queries(count: int, hours: int, seed: int) -> list[Query]:
    generator = random.Random(seed)
    return [
        Query(
            gpu=gpu_uuid(generator.randrange(GPU_COUNT)),
            start=START + timedelta(minutes=generator.randrange((hours - 1) * 60)),
        )
        for _ in range(count)
    ]


def time_direct(engine, queries: list[Query]) -> list[float]:  # type: ignore[no-untyped-def]
    timings = []
    for query in queries:
        started = time.perf_counter()
        with engine.connect() as connection:
            statement = telemetry_page_statement(
                query.gpu, start_time=query.start, end_time=query.end, limit=PAGE_LIMIT + 1
            )
            rows = fetch_telemetry_page(connection, statement)
        timings.append(time.perf_counter() - started)
        assert len(rows) == PAGE_LIMIT + 1, len(rows)
    return timings


def time_api(client: httpx.Client, queries: list[Query]) -> list[float]:
    timings = []
    for query in queries:
        started = time.perf_counter()
        response = client.get(f"/api/v1/gpus/{query.gpu}/telemetry", params=query.params())
        body = response.content
        timings.append(time.perf_counter() - started)
        assert response.status_code == 200, body[:300]
    return timings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(database_url: str, port: int) -> subprocess.Popen[bytes]:
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "API_PORT": str(port),
        "API_HOST": "127.0.0.1",
        "API_WORKERS": "1",
        "API_LOG_LEVEL": "WARNING",
    }
    environment.pop("API_TOKEN", None)
    process = subprocess.Popen([sys.executable, "-m", "api"], cwd=ROOT, env=environment)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"API server exited with status {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"API server did not start within {START_TIMEOUT_S} s")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument(
        "--samples",
        type=int,
        default=10_000_000,
        help="samples in the database (default 10 million)",
    )
    parser.add_argument(
        "--queries", type=int, default=100, help="distinct (GPU, window) queries per round"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds of direct and API timings"
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    path = args.cache_dir / f"api_{args.samples}.db"
    if not path.exists():
        build_database(path, args.samples)
    size_gb = sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e9
    hours = args.samples // (GPU_COUNT * len(METRIC_NAMES)) * TICK_S // 3600
    print(
        f"database {path}: {args.samples:,} samples, {GPU_COUNT} GPUs, {hours} h of data, {size_gb:.2f} GB",
        flush=True,
    )

    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the run",
        flush=True,
    )
    database_url = f"sqlite:///{path}"
    queries = make_queries(args.queries, hours, args.seed)
    engine = make_engine(database_url)
    port = free_port()
    server = start_server(database_url, port)
    direct: list[float] = []
    api: list[float] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
            time_direct(engine, queries)  # warm the page cache and both code paths
            time_api(client, queries)
            for _ in range(args.rounds):
                direct.extend(time_direct(engine, queries))
                api.extend(time_api(client, queries))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=15)
        engine.dispose()

    print(f"{'path':<8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}  n")
    for name, values in (("direct", direct), ("api", api)):
        print(
            f"{name:<8}{percentile(values, 0.5) * 1e3:>9.2f}{percentile(values, 0.9) * 1e3:>9.2f}"
            f"{percentile(values, 0.99) * 1e3:>9.2f}{statistics.fmean(values) * 1e3:>9.2f}  {len(values)}"
        )
    print(f"load average {os.getloadavg()[0]:.2f} after the run")
    ratio = percentile(api, 0.5) / percentile(direct, 0.5)
    print(f"p50 ratio api/direct: {ratio:.2f} (target at most 2.00)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
