"""The collector's push mode: the webhook endpoint over real HTTP on 127.0.0.1, real databases.

In-process tests run ``WebhookServer`` (uvicorn) on the test's event loop; the
process tests start ``python -m collector --mode push`` against a real queue.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from collector.push import WEBHOOK_PATH, PushReceiver, WebhookServer
from telemetry.database import make_engine
from telemetry.record import TELEMETRY_QUEUE, TelemetryRecord
from telemetry.tables import TelemetrySample
from telemetry.webhooks import HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, generate_secret, signature_header

ROOT = Path(__file__).resolve().parents[2]
SECRET = generate_secret()


def migrate(url: str) -> str:
    config = Config(str(ROOT / "migrations" / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")
    return url


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    created = make_engine(migrate(sqlite_url))
    try:
        yield created
    finally:
        created.dispose()


def records(count: int, run: str = "push") -> list[TelemetryRecord]:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        TelemetryRecord(
            uuid=f"GPU-{n % 4}",
            hostname="host-1",
            gpu_index=n % 4,
            device=f"nvidia{n % 4}",
            model_name="NVIDIA H100 80GB HBM3",
            metric_name="DCGM_FI_DEV_GPU_TEMP",
            value=40.0 + n,
            timestamp=start + timedelta(seconds=n),
            key=f"{run}:{n}",
        )
        for n in range(count)
    ]


def batch(items: list[TelemetryRecord]) -> bytes:
    messages = [
        {"id": f"1-{n}", "deliveries": 1, "published_at": "2026-01-01T00:00:00.000000Z", "body": r.to_body()}
        for n, r in enumerate(items)
    ]
    return orjson.dumps({"queue": TELEMETRY_QUEUE, "subscription": "collectors", "messages": messages})


def signed_headers(body: bytes, *, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        HEADER_ID: "msg_test",
        HEADER_TIMESTAMP: str(stamp),
        HEADER_SIGNATURE: signature_header([secret], "msg_test", stamp, body),
    }


def sample_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(TelemetrySample)).scalar_one())


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check that ``response`` is an RFC 9457 problem details response of ``status``, and return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "about:blank"
    assert problem["status"] == status
    assert problem["title"]
    assert problem["detail"]
    return dict(problem)


@asynccontextmanager
async def webhook(engine: Engine) -> AsyncIterator[tuple[httpx.AsyncClient, PushReceiver]]:
    """Serve push mode on a free loopback port; yield a client for it and the receiver."""
    receiver = PushReceiver(engine, secrets=[SECRET])
    server = WebhookServer(receiver, host="127.0.0.1", port=0)
    serving = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as client:
            for _ in range(200):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.02)
            yield client, receiver
    finally:
        server.stop()
        await asyncio.wait_for(serving, 10)


@pytest.mark.parametrize(
    ("secret", "age_s"),
    [(generate_secret(), 0), (SECRET, 301), (SECRET, -301)],
    ids=["wrong-secret", "timestamp-too-old", "timestamp-in-future"],
)
def test_invalid_request_is_401_and_stores_nothing(engine: Engine, secret: str, age_s: int) -> None:
    async def scenario() -> None:
        async with webhook(engine) as (client, _):
            body = batch(records(3))
            headers = signed_headers(body, secret=secret, timestamp=int(time.time()) - age_s)
            response = await client.post(WEBHOOK_PATH, content=body, headers=headers)
            assert_problem(response, 401)

    asyncio.run(scenario())
    assert sample_count(engine) == 0


def test_unsigned_request_is_401(engine: Engine) -> None:
    async def scenario() -> None:
        async with webhook(engine) as (client, _):
            response = await client.post(WEBHOOK_PATH, content=batch(records(1)))
            problem = assert_problem(response, 401)
            assert "webhook-signature" in problem["detail"]

    asyncio.run(scenario())
    assert sample_count(engine) == 0


def test_timestamp_within_tolerance_is_accepted(engine: Engine) -> None:
    async def scenario() -> None:
        async with webhook(engine) as (client, _):
            body = batch(records(2))
            headers = signed_headers(body, timestamp=int(time.time()) - 290)
            response = await client.post(WEBHOOK_PATH, content=body, headers=headers)
            assert response.status_code == 200, response.text

    asyncio.run(scenario())
    assert sample_count(engine) == 2


def test_redelivered_batch_is_stored_once(engine: Engine) -> None:
    async def scenario() -> None:
        async with webhook(engine) as (client, _):
            body = batch(records(20))
            first = await client.post(WEBHOOK_PATH, content=body, headers=signed_headers(body))
            second = await client.post(WEBHOOK_PATH, content=body, headers=signed_headers(body))
            assert first.status_code == 200, first.text
            assert first.json() == {"stored": 20, "duplicates": 0, "rejected": []}
            assert second.status_code == 200, second.text
            assert second.json() == {"stored": 0, "duplicates": 20, "rejected": []}

    asyncio.run(scenario())
    assert sample_count(engine) == 20


def test_invalid_body_is_400(engine: Engine) -> None:
    async def scenario() -> None:
        async with webhook(engine) as (client, _):
            body = b'{"items": []}'
            response = await client.post(WEBHOOK_PATH, content=body, headers=signed_headers(body))
            problem = assert_problem(response, 400)
            assert problem["detail"] == "expected a JSON object with a 'messages' list"

    asyncio.run(scenario())


def test_invalid_record_is_acked_and_named(engine: Engine) -> None:
    async def scenario() -> None:
        async with webhook(engine) as (client, _):
            good = orjson.loads(batch(records(1)))
            good["messages"].append({"id": "1-9", "deliveries": 1, "published_at": "x", "body": {"uuid": ""}})
            body = orjson.dumps(good)
            response = await client.post(WEBHOOK_PATH, content=body, headers=signed_headers(body))
            assert response.status_code == 200, response.text
            assert response.json()["stored"] == 1
            assert [item["id"] for item in response.json()["rejected"]] == ["1-9"]

    asyncio.run(scenario())
    assert sample_count(engine) == 1


def test_value_beyond_double_range_rejected_alone(engine: Engine) -> None:
    # The queue server delivers such a number as sent, and it is valid JSON.
    body = batch(records(2)).replace(b'"value":41.0', b'"value":1e400')
    assert b"1e400" in body

    async def scenario() -> None:
        async with webhook(engine) as (client, _):
            response = await client.post(WEBHOOK_PATH, content=body, headers=signed_headers(body))
            assert response.status_code == 200, response.text
            assert response.json()["stored"] == 1
            assert [item["id"] for item in response.json()["rejected"]] == ["1-1"]

    asyncio.run(scenario())
    assert sample_count(engine) == 1


def test_database_down_is_503_then_stored(temporary_postgres: Any) -> None:
    url = migrate(temporary_postgres.url)
    engine = make_engine(url)

    async def scenario() -> None:
        async with webhook(engine) as (client, receiver):
            body = batch(records(5))
            temporary_postgres.stop()
            response = await client.post(WEBHOOK_PATH, content=body, headers=signed_headers(body))
            problem = assert_problem(response, 503)
            assert problem["detail"] == "the database is unavailable"
            assert response.headers["retry-after"] == "5"
            assert receiver.database_failing

            temporary_postgres.start()
            # The first request after the restart may meet a pooled connection of the stopped server.
            for _ in range(5):
                response = await client.post(WEBHOOK_PATH, content=body, headers=signed_headers(body))
                if response.status_code != 503:
                    break
            assert response.status_code == 200, response.text
            assert response.json()["stored"] == 5

    try:
        asyncio.run(scenario())
        assert sample_count(engine) == 5
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", WEBHOOK_PATH, 405), ("POST", "/no-such-path", 404)],
    ids=["get-webhook", "unknown-path"],
)
def test_routing_errors_are_problems(engine: Engine, method: str, path: str, status: int) -> None:
    async def scenario() -> None:
        async with webhook(engine) as (client, _):
            assert_problem(await client.request(method, path), status)

    asyncio.run(scenario())


def test_unmigrated_database_is_503(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)

    async def scenario() -> None:
        async with webhook(engine) as (client, _):
            body = batch(records(2))
            response = await client.post(WEBHOOK_PATH, content=body, headers=signed_headers(body))
            problem = assert_problem(response, 503)
            assert problem["detail"] == "the database is unavailable"
            assert response.headers["retry-after"] == "5"

            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["missing_tables"] == ["gpus", "gpu_metrics", "telemetry_samples"]

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()


# The collector as a process


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def collector_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_collector(
    started: list[subprocess.Popen[bytes]], log_path: Path, env: dict[str, str], *args: str
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "collector", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=ROOT,
        )
    started.append(process)
    return process


def test_push_mode_needs_secret_or_register_url(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("COLLECTOR_")}
    result = subprocess.run(
        [sys.executable, "-m", "collector", "--mode", "push"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 2
    assert "COLLECTOR_WEBHOOK_SECRET" in result.stderr


def test_process_registers_and_stores(
    start_queue_server: Callable[..., Any],
    sqlite_url: str,
    tmp_path: Path,
    collector_processes: list[subprocess.Popen[bytes]],
) -> None:
    queue = start_queue_server(QUEUE_FSYNC="never", QUEUE_PUSH_ALLOWED_NETWORKS="127.0.0.0/8")
    migrate(sqlite_url)
    port = free_port()
    log_path = tmp_path / "collector.log"
    env = {
        "COLLECTOR_QUEUE_URLS": queue.url,
        "DATABASE_URL": sqlite_url,
        "COLLECTOR_PORT": str(port),
        "COLLECTOR_WEBHOOK_SECRET": SECRET,
    }
    process = run_collector(
        collector_processes, log_path, env, "--mode", "push", "--register-url", f"http://127.0.0.1:{port}/webhook"
    )

    subscription_url = f"{queue.url}/v1/queues/{TELEMETRY_QUEUE}/subscriptions/collectors"
    deadline = time.monotonic() + 30
    while httpx.get(subscription_url, timeout=5).status_code != 200:
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)

    items = records(300)
    messages = [{"body": r.to_body(), "key": r.key} for r in items]
    response = httpx.post(f"{queue.url}/v1/queues/{TELEMETRY_QUEUE}/messages", json={"messages": messages}, timeout=10)
    assert response.status_code == 200, response.text

    engine = make_engine(sqlite_url)
    try:
        deadline = time.monotonic() + 30
        while sample_count(engine) < 300:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert sample_count(engine) == 300
    finally:
        engine.dispose()

    described = httpx.get(subscription_url, timeout=5).json()
    assert described["endpoint"] == f"http://127.0.0.1:{port}/webhook"
    assert described["stats"]["messages_delivered"] == 300
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert re.search(r'telemetry_collector_webhook_requests_total\{status="200"\} [1-9]', metrics)

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
