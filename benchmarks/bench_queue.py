"""Queue benchmark: durable publish -> lease -> ack throughput against the HTTP ceiling,
plus server memory with a large backlog and restart time with that backlog.

Usage: python benchmarks/bench_queue.py [--messages N] [--backlog N] [--csv PATH]

Everything runs on 127.0.0.1: one server process (python -m queue_server, fsync
always) and this client process. The ceiling run starts the same granian and
Starlette stack with no-op handlers. They accept and drop publish and ack bodies
and return one pre-encoded response to every lease. The same client loop drives
both, with the same request and response shapes.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from telemetry.queue_client import OutgoingMessage, QueueClient, RetryPolicy  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "dcgm_metrics_20250718_134233.csv"
BATCH = 1000
PUBLISHERS = 4
CONSUMERS = 4


def telemetry_bodies(csv_path: Path) -> list[dict[str, Any]]:
    """Build message bodies of about 300 bytes from the CSV rows, as the streamer publishes them."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    bodies = []
    with csv_path.open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            bodies.append(
                {
                    "uuid": row["uuid"],
                    "hostname": row["Hostname"],
                    "gpu_index": int(row["gpu_id"]),
                    "device": row["device"],
                    "model_name": row["modelName"],
                    "metric_name": row["metric_name"],
                    "value": float(row["value"]),
                    "timestamp": stamp,
                    "source_timestamp": row["timestamp"],
                    "key": f"{csv_path.name}:bench:{line}",
                }
            )
    return bodies


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_process(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> float:
    """Poll /readyz every 10 ms; return the seconds it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} was not ready within {timeout_s} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found")


async def pipeline(url: str, bodies: list[dict[str, Any]], total: int) -> float:
    """Publish ``total`` messages in batches of 1000 while consumers lease and ack; return msgs/s."""
    retry = RetryPolicy(max_attempts=3)
    acked = 0
    done = asyncio.Event()
    batches = total // BATCH
    next_batch = 0

    async with QueueClient(url, retry=retry, max_connections=8) as client:
        await client.create_queue("bench", visibility_timeout_s=120)

        async def publisher() -> None:
            nonlocal next_batch
            while next_batch < batches:
                number = next_batch
                next_batch += 1
                start = (number * BATCH) % len(bodies)
                chunk = [bodies[(start + i) % len(bodies)] for i in range(BATCH)]
                await client.publish("bench", [OutgoingMessage(body=b) for b in chunk])

        async def consumer() -> None:
            nonlocal acked
            while not done.is_set():
                messages = await client.lease("bench", max_messages=BATCH, wait_s=1)
                if messages:
                    await client.ack("bench", [m.receipt for m in messages])
                    acked += len(messages)
                    if acked >= total:
                        done.set()

        started = time.perf_counter()
        consumers = [asyncio.create_task(consumer()) for _ in range(CONSUMERS)]
        await asyncio.gather(*(publisher() for _ in range(PUBLISHERS)))
        await done.wait()
        elapsed = time.perf_counter() - started
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    return total / elapsed


def run_queue(bodies: list[dict[str, Any]], total: int) -> float:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        process = start_process(["-m", "queue_server", "--port", str(port), "--data-dir", data_dir, "--fsync", "always"])
        try:
            wait_ready(url, process)
            return asyncio.run(pipeline(url, bodies, total))
        finally:
            stop(process)


def run_ceiling(bodies: list[dict[str, Any]], total: int) -> float:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process([str(Path(__file__)), "--serve-noop", str(port)])
    try:
        wait_ready(url, process)
        return asyncio.run(pipeline(url, bodies, total))
    finally:
        stop(process)


def serve_noop(port: int, csv_path: Path) -> None:
    """Serve the API's three request/response shapes with constant responses (the HTTP ceiling)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from queue_server.server import build_server
    from queue_server.settings import load_settings

    bodies = telemetry_bodies(csv_path)
    published = orjson.dumps({"results": [{"id": f"1-{i}", "duplicate": False} for i in range(BATCH)]})
    leased = orjson.dumps(
        {
            "messages": [
                {
                    "id": f"1-{i}",
                    "receipt": f"1-{i}-1-2",
                    "deliveries": 1,
                    "published_at": "2026-01-01T00:00:00.000000Z",
                    "body": bodies[i % len(bodies)],
                }
                for i in range(BATCH)
            ]
        }
    )
    acked = orjson.dumps({"results": [{"receipt": f"1-{i}-1-2", "status": "acked"} for i in range(BATCH)]})

    def constant(answer: bytes, read_body: bool):
        async def endpoint(request: Request) -> Response:
            if read_body:
                await request.body()
            return Response(answer, media_type="application/json")

        return endpoint

    routes = [
        Route("/readyz", constant(b'{"status":"ready"}', False), methods=["GET"]),
        Route("/v1/queues/{name}", constant(b'{"name":"bench"}', True), methods=["PUT"]),
        Route("/v1/queues/{name}/messages", constant(published, True), methods=["POST"]),
        Route("/v1/queues/{name}/leases", constant(leased, True), methods=["POST"]),
        Route("/v1/queues/{name}/acks", constant(acked, True), methods=["POST"]),
    ]
    settings = load_settings(["--port", str(port), "--log-level", "WARNING"])
    server = build_server(settings, Starlette(routes=routes))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, server.stop)
        await server.serve()

    asyncio.run(main())


def run_backlog(bodies: list[dict[str, Any]], backlog: int) -> dict[str, float]:
    """Measure RSS empty and with ``backlog`` messages, then the restart time to ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        args = ["-m", "queue_server", "--port", str(port), "--data-dir", data_dir]
        process = start_process(args + ["--fsync", "never"])
        results: dict[str, float] = {}
        try:
            wait_ready(url, process)

            async def fill() -> None:
                async with QueueClient(url, max_connections=8) as client:
                    await client.create_queue("backlog")
                    results["rss_empty_mib"] = rss_mib(process.pid)
                    batches = iter(range(backlog // BATCH))

                    async def worker() -> None:
                        for number in batches:
                            start = (number * BATCH) % len(bodies)
                            chunk = [
                                OutgoingMessage(body=bodies[(start + i) % len(bodies)], key=f"b{number}:{i}")
                                for i in range(BATCH)
                            ]
                            await client.publish("backlog", chunk)

                    await asyncio.gather(*(worker() for _ in range(4)))
                    stats = (await client.get_queue("backlog"))["stats"]
                    assert stats["ready"] == backlog, stats

            started = time.perf_counter()
            asyncio.run(fill())
            results["fill_s"] = time.perf_counter() - started
            results["rss_backlog_mib"] = rss_mib(process.pid)
            stop(process)

            process = start_process(args)
            results["restart_to_ready_s"] = wait_ready(url, process)
            results["rss_after_restart_mib"] = rss_mib(process.pid)
            results["wal_mib"] = sum(p.stat().st_size for p in Path(data_dir).glob("*.wal")) / 2**20
        finally:
            if process.poll() is None:
                stop(process)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000, help="messages per throughput run (default 200000)")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="backlog size for memory and restart (default 1000000)")
    parser.add_argument("--runs", type=int, default=2, help="alternating queue/ceiling runs (default 2)")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="DCGM CSV to build bodies from")
    parser.add_argument("--serve-noop", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        serve_noop(args.serve_noop, args.csv)
        return

    bodies = telemetry_bodies(args.csv)
    size = sum(len(orjson.dumps(b)) for b in bodies) / len(bodies)
    print(f"bodies: {len(bodies)} rows from {args.csv.name}, mean {size:.0f} bytes")
    for run in range(1, args.runs + 1):
        queue = run_queue(bodies, args.messages)
        ceiling = run_ceiling(bodies, args.messages)
        print(
            f"run {run}: queue {queue:,.0f} msg/s, HTTP ceiling {ceiling:,.0f} msg/s, "
            f"ratio {queue / ceiling:.2f}"
        )
    if args.backlog:
        results = run_backlog(bodies, args.backlog)
        print(
            f"backlog {args.backlog:,}: RSS empty {results['rss_empty_mib']:.0f} MiB, "
            f"with backlog {results['rss_backlog_mib']:.0f} MiB "
            f"(+{results['rss_backlog_mib'] - results['rss_empty_mib']:.0f} MiB), "
            f"after restart {results['rss_after_restart_mib']:.0f} MiB; "
            f"restart to ready {results['restart_to_ready_s']:.2f} s; "
            f"WAL {results['wal_mib']:.0f} MiB; fill {results['fill_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
