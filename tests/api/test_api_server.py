"""The real ``python -m api`` process, served by granian on a free loopback port."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from api_test_data import API_TOKEN, GPU_UUID, make_record, store_in_batches

from telemetry.database import make_engine
from telemetry.tables import metadata

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(base_url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited early with status {process.returncode}"
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server did not answer /healthz within {START_TIMEOUT_S} s")


def answered_keep_alive_requests(port: int, connections: int) -> int:
    """Send two requests on each of several keep-alive connections; return how many got 200."""
    clients = [
        http.client.HTTPConnection("127.0.0.1", port, timeout=5.0) for _ in range(connections)
    ]
    answered = 0
    try:
        for _ in range(2):
            for client in clients:
                client.request("GET", "/healthz")
                response = client.getresponse()
                response.read()
                answered += response.status == 200
    finally:
        for client in clients:
            client.close()
    return answered


def test_served_process_answers_and_stops(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'telemetry.db'}"
    engine = make_engine(database_url)
    metadata.create_all(engine)
    store_in_batches(engine, [make_record()])
    engine.dispose()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "API_TOKEN": API_TOKEN,
        "API_WORKERS": "1",
        "API_THREADS": "2",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "api"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_healthy(base_url, process)
        headers = {"Authorization": f"Bearer {API_TOKEN}"}

        gpus = httpx.get(f"{base_url}/api/v1/gpus", headers=headers, timeout=5.0)
        unauthorized = httpx.get(f"{base_url}/api/v1/gpus", timeout=5.0)

        assert gpus.status_code == 200
        assert gpus.json()["count"] == 1
        assert gpus.json()["items"][0]["id"] == GPU_UUID
        assert unauthorized.status_code == 401
        assert unauthorized.headers["content-type"] == "application/problem+json"
        # More idle keep-alive connections than request threads must not block a new request.
        assert answered_keep_alive_requests(port, connections=4) == 8
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output.decode(errors="replace")
    assert b"Listening at" in output


def healthz_requests_counted(metrics_text: str) -> float:
    """Sum the request counter of GET /healthz with status 200 in a Prometheus text scrape."""
    prefix = 'api_http_requests_total{method="GET",route="/healthz",status="200"}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if line.startswith(prefix))


def test_metrics_sum_every_worker(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'telemetry.db'}"
    engine = make_engine(database_url)
    metadata.create_all(engine)
    engine.dispose()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    environment = {
        key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"
    }
    environment.update(
        {"DATABASE_URL": database_url, "API_HOST": "127.0.0.1", "API_PORT": str(port), "API_WORKERS": "2"}
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "api"], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_until_healthy(base_url, process)
        # A new connection per request, so that both workers take some of them.
        for _ in range(40):
            assert httpx.get(f"{base_url}/healthz", timeout=5.0).status_code == 200
        scrapes = [httpx.get(f"{base_url}/metrics", timeout=5.0).text for _ in range(4)]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()

    # wait_until_healthy sent at least one more /healthz request before the 40.
    counts = [healthz_requests_counted(text) for text in scrapes]
    assert all(count >= 41 for count in counts), counts
    assert len(set(counts)) == 1, counts
    assert process.returncode == 0, output.decode(errors="replace")
