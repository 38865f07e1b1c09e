"""Streamer benchmark: CSV parse rate and memory, and publish rate of 1 and 2 streamer processes.

Usage: python benchmarks/bench_streamer.py [--rows N]

Everything runs on 127.0.0.1. Each publish run starts its own queue server process
(python -m queue_server, default settings). It times real streamer processes
(python -m streamer --passes 1 --interval 0) from start to exit, so the figures
include process start-up, run creation and shard planning.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamer import dcgm_csv  # noqa: E402
from streamer.dcgm_csv import ParsedRow, read_header, read_rows  # noqa: E402
from streamer.sample import SampleSpec, write_sample  # noqa: E402

REAL_CSV = ROOT.parent / "shared" / "data" / "dcgm_metrics_20250718_134233.csv"


def write_dump(path: Path, rows: int) -> Path:
    scrapes = max(1, rows // 2000)
    with path.open("w", encoding="utf-8", newline="") as output:
        write_sample(output, SampleSpec(hosts=25, gpus_per_host=8, scrapes=scrapes))
    return path


def parse_rate(path: Path) -> tuple[int, float, int]:
    """Return rows parsed, rows per second and the peak traced memory of a second parse in bytes."""
    started = time.perf_counter()
    count = sum(1 for row in read_rows(path, read_header(path)) if isinstance(row, ParsedRow))
    elapsed = time.perf_counter() - started

    # tracemalloc slows parsing several times over, so memory is measured in a separate pass.
    # The label cache is emptied first, so the peak includes filling it again.
    dcgm_csv._label_pairs.cache_clear()
    tracemalloc.start()
    for _ in read_rows(path, read_header(path)):
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return count, count / elapsed, peak


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def publish_rate(path: Path, rows: int, streamers: int, workdir: Path) -> float:
    """Start a queue server and ``streamers`` streamer processes; return rows per second."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = Path(tempfile.mkdtemp(dir=workdir))
    log = (workdir / f"queue-{port}.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "queue_server", "--port", str(port), "--data-dir", str(data_dir)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the queue server did not become ready within 30 s")
            time.sleep(0.05)

        command = [
            sys.executable, "-m", "streamer", "--queue-urls", url, "--csv", str(path),
            "--passes", "1", "--interval", "0", "--port", "0", "--log-level", "WARNING",
        ]
        started = time.perf_counter()
        processes = [subprocess.Popen(command, cwd=ROOT) for _ in range(streamers)]
        codes = [process.wait(timeout=600) for process in processes]
        elapsed = time.perf_counter() - started
        if codes != [0] * streamers:
            raise RuntimeError(f"streamers exited with {codes}")
        stored = httpx.get(f"{url}/v1/queues/telemetry", timeout=5).json()["stats"]["published_total"]
        if stored != rows:
            raise RuntimeError(f"the queue stored {stored} rows, expected {rows}")
        return rows / elapsed
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the generated dump (default 100000)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        small = write_dump(workdir / "small.csv", args.rows)
        large = write_dump(workdir / "large.csv", args.rows * 4)
        small_rows, small_rate, small_peak = parse_rate(small)
        large_rows, large_rate, large_peak = parse_rate(large)
        print(f"parse {small_rows} rows: {small_rate:,.0f} rows/s, peak traced memory {small_peak / 1e6:.2f} MB")
        print(f"parse {large_rows} rows: {large_rate:,.0f} rows/s, peak traced memory {large_peak / 1e6:.2f} MB")
        if REAL_CSV.is_file():
            real_rows, real_rate, _ = parse_rate(REAL_CSV)
            print(f"parse real CSV ({real_rows} rows): {real_rate:,.0f} rows/s")

        for streamers in (1, 2):
            rate = publish_rate(small, small_rows, streamers, workdir)
            print(f"publish {small_rows} rows with {streamers} streamer(s): {rate:,.0f} rows/s end to end")
    print(f"machine: {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
