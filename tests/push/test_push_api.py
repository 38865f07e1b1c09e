"""The subscription API in-process: validation, auth, secret rotation and storage in the log.

Endpoints resolve through a table to 127.0.0.1 (allowlisted) and the sender's
transport returns 200 in-process, so no request leaves the test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from queue_server.auth import Tokens, parse_tokens
from queue_server.http.app import create_app
from queue_server.push.guard import EndpointGuard, StaticResolver, parse_networks
from queue_server.push.service import PushService
from queue_server.service import QueueService, ServiceOptions
from queue_server.wal.log import DEFAULT_SEGMENT_BYTES
from telemetry.webhooks import InvalidSignature, verify

ENDPOINT = "http://receiver.test:8080/hook"


class AcceptingTransport(httpx.AsyncBaseTransport):
    """Return 200 for every delivery and keep the requests."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        return httpx.Response(200)


@asynccontextmanager
async def api(
    data_dir: Path, *, tokens: Tokens | None = None, segment_bytes: int = DEFAULT_SEGMENT_BYTES
) -> AsyncIterator[tuple[httpx.AsyncClient, AcceptingTransport, QueueService]]:
    service = QueueService(ServiceOptions(data_dir=data_dir, min_free_bytes=0, segment_bytes=segment_bytes))
    transport = AcceptingTransport()
    guard = EndpointGuard(
        allowed_networks=parse_networks(["127.0.0.0/8"]),
        resolver=StaticResolver({"receiver.test": ["127.0.0.1"]}),
    )
    push = PushService(service, guard=guard, transport=transport, wait_s=0.05)
    app = create_app(service, tokens or Tokens({}), manage_service=True, push=push)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://queue.test") as client:
            yield client, transport, service


async def create_queue(client: httpx.AsyncClient, name: str = "jobs") -> None:
    response = await client.put(f"/v1/queues/{name}", json={})
    assert response.status_code in (200, 201), response.text


def run(scenario: Any) -> None:
    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "needs 'endpoint'"),
        ({"endpoint": "ftp://receiver.test/"}, "http:// or https://"),
        ({"endpoint": "http://user:pw@receiver.test/"}, "credentials"),
        ({"endpoint": 5}, "endpoint=5"),
        ({"endpoint": ENDPOINT, "batch_size": 1001}, "batch_size=1001"),
        ({"endpoint": ENDPOINT, "batch_size": 0}, "batch_size=0"),
        ({"endpoint": ENDPOINT, "max_concurrency": 0}, "max_concurrency=0"),
        ({"endpoint": ENDPOINT, "timeout_s": 0}, "timeout_s=0"),
        ({"endpoint": ENDPOINT, "retry": {"initial_backoff_s": 5, "max_backoff_s": 1}}, "max_backoff_s=1"),
        ({"endpoint": ENDPOINT, "retry": {"tries": 3}}, "'tries'"),
        ({"endpoint": ENDPOINT, "secret": "hunter2"}, "whsec_"),
        ({"endpoint": ENDPOINT, "colour": "blue"}, "'colour'"),
        ({"endpoint": "http://unknown.test/"}, "could not be resolved"),
    ],
    ids=[
        "no-endpoint", "scheme", "credentials", "not-a-string", "batch-too-big", "batch-zero",
        "concurrency-zero", "timeout-zero", "backoff-order", "retry-field", "secret-format", "unknown-field",
        "unresolvable",
    ],
)
def test_put_invalid_body_is_400(tmp_path: Path, body: dict[str, Any], fragment: str) -> None:
    async def scenario() -> None:
        async with api(tmp_path) as (client, _, _):
            await create_queue(client)
            response = await client.put("/v1/queues/jobs/subscriptions/hook", json=body)
            assert response.status_code == 400
            assert fragment in response.json()["detail"]

    run(scenario)


def test_unknown_queue_and_subscription_are_404(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with api(tmp_path) as (client, _, _):
            response = await client.put("/v1/queues/nope/subscriptions/hook", json={"endpoint": ENDPOINT})
            assert response.status_code == 404
            await create_queue(client)
            missing = await client.get("/v1/queues/jobs/subscriptions/hook")
            assert missing.status_code == 404
            assert "PUT /v1/queues/jobs/subscriptions/hook" in missing.json()["detail"]
            assert (await client.delete("/v1/queues/jobs/subscriptions/hook")).status_code == 404
            assert (await client.put("/v1/queues/jobs/subscriptions/bad name", json={"endpoint": ENDPOINT})).status_code == 400

    run(scenario)


def test_put_get_list_update_delete(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with api(tmp_path) as (client, _, _):
            await create_queue(client)
            created = await client.put(
                "/v1/queues/jobs/subscriptions/hook",
                json={"endpoint": ENDPOINT, "batch_size": 500, "max_concurrency": 8, "timeout_s": 5},
            )
            assert created.status_code == 201
            assert created.headers["cache-control"] == "no-store"
            body = created.json()
            assert body["secret"].startswith("whsec_")
            assert body["batch_size"] == 500
            assert body["retry"] == {"initial_backoff_s": 1.0, "max_backoff_s": 300.0}

            updated = await client.put("/v1/queues/jobs/subscriptions/hook", json={"batch_size": 10})
            assert updated.status_code == 200
            assert "secret" not in updated.json()
            assert updated.json()["batch_size"] == 10
            assert updated.json()["max_concurrency"] == 8

            listed = (await client.get("/v1/queues/jobs/subscriptions")).json()["subscriptions"]
            assert [s["name"] for s in listed] == ["hook"]
            assert "secret" not in listed[0]
            assert set(listed[0]["stats"]) >= {"attempts", "messages_delivered", "concurrency", "backlog", "in_flight"}

            assert (await client.delete("/v1/queues/jobs/subscriptions/hook")).status_code == 204
            assert (await client.get("/v1/queues/jobs/subscriptions")).json() == {"subscriptions": []}

    run(scenario)


def test_put_needs_admin_scope(tmp_path: Path) -> None:
    tokens = parse_tokens("consume:reader;admin:boss", source="QUEUE_TOKENS")

    async def scenario() -> None:
        async with api(tmp_path, tokens=tokens) as (client, _, _):
            admin = {"authorization": "Bearer boss"}
            assert (await client.put("/v1/queues/jobs", json={}, headers=admin)).status_code == 201
            reader = {"authorization": "Bearer reader"}
            denied = await client.put("/v1/queues/jobs/subscriptions/hook", json={"endpoint": ENDPOINT}, headers=reader)
            assert denied.status_code == 403
            anonymous = await client.get("/v1/queues/jobs/subscriptions")
            assert anonymous.status_code == 401
            allowed = await client.put("/v1/queues/jobs/subscriptions/hook", json={"endpoint": ENDPOINT}, headers=admin)
            assert allowed.status_code == 201
            assert (await client.get("/v1/queues/jobs/subscriptions", headers=reader)).status_code == 200

    run(scenario)


def test_rotation_signs_with_both_secrets_during_overlap(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with api(tmp_path) as (client, transport, _):
            await create_queue(client)
            old = (await client.put("/v1/queues/jobs/subscriptions/hook", json={"endpoint": ENDPOINT})).json()["secret"]
            rotated = await client.post("/v1/queues/jobs/subscriptions/hook/rotate-secret", json={"secret_overlap_s": 600})
            assert rotated.status_code == 200
            new = rotated.json()["secret"]
            assert new != old
            assert rotated.json()["previous_secret_expires_at"] > time.time() + 500

            await client.post("/v1/queues/jobs/messages", json={"messages": [{"body": 1}]})
            await wait_for(lambda: transport.requests)
            request = transport.requests[0]
            signatures = request.headers["webhook-signature"].split(" ")
            assert len(signatures) == 2
            for secret in (old, new):
                verify([secret], request.headers, request.content, now=time.time())

    run(scenario)


def test_rotation_without_overlap_drops_old_secret(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with api(tmp_path) as (client, transport, _):
            await create_queue(client)
            old = (await client.put("/v1/queues/jobs/subscriptions/hook", json={"endpoint": ENDPOINT})).json()["secret"]
            rotated = await client.post("/v1/queues/jobs/subscriptions/hook/rotate-secret", json={"secret_overlap_s": 0})
            new = rotated.json()["secret"]
            assert rotated.json()["previous_secret_expires_at"] is None

            await client.post("/v1/queues/jobs/messages", json={"messages": [{"body": 1}]})
            await wait_for(lambda: transport.requests)
            request = transport.requests[0]
            verify([new], request.headers, request.content, now=time.time())
            with pytest.raises(InvalidSignature):
                verify([old], request.headers, request.content, now=time.time())

    run(scenario)


def test_put_with_given_secret_is_not_echoed(tmp_path: Path) -> None:
    chosen = "whsec_" + "Zm9vYmFy" * 4

    async def scenario() -> None:
        async with api(tmp_path) as (client, transport, _):
            await create_queue(client)
            created = await client.put("/v1/queues/jobs/subscriptions/hook", json={"endpoint": ENDPOINT, "secret": chosen})
            assert created.status_code == 201
            assert "secret" not in created.json()
            await client.post("/v1/queues/jobs/messages", json={"messages": [{"body": 1}]})
            await wait_for(lambda: transport.requests)
            verify([chosen], transport.requests[0].headers, transport.requests[0].content, now=time.time())

    run(scenario)


def test_subscriptions_survive_restart_and_checkpoints(tmp_path: Path) -> None:
    """Subscriptions come back from log records and, after segment rollover, from checkpoints."""

    async def first_run() -> str:
        async with api(tmp_path, segment_bytes=4096) as (client, _, _):
            await create_queue(client)
            secret = (await client.put("/v1/queues/jobs/subscriptions/keep", json={"endpoint": ENDPOINT, "batch_size": 7})).json()["secret"]
            await client.put("/v1/queues/jobs/subscriptions/drop", json={"endpoint": ENDPOINT})
            assert (await client.delete("/v1/queues/jobs/subscriptions/drop")).status_code == 204
            # Enough log traffic to start new segments, whose checkpoints must carry the subscription.
            for _ in range(5):
                await client.post("/v1/queues/other", json={})
                await client.put("/v1/queues/other", json={"max_deliveries": 3})
                await client.post("/v1/queues/jobs/messages", json={"messages": [{"body": "x" * 1500}]})
            return secret

    async def second_run(secret: str) -> None:
        async with api(tmp_path, segment_bytes=4096) as (client, transport, service):
            listed = (await client.get("/v1/queues/jobs/subscriptions")).json()["subscriptions"]
            assert [(s["name"], s["batch_size"]) for s in listed] == [("keep", 7)]
            await client.post("/v1/queues/jobs/messages", json={"messages": [{"body": "after restart"}]})
            await wait_for(lambda: transport.requests)
            request = transport.requests[0]
            verify([secret], request.headers, request.content, now=time.time())

    secret = asyncio.run(first_run())
    segments = sorted(path.name for path in tmp_path.glob("*.wal"))
    assert len(segments) >= 1
    asyncio.run(second_run(secret))


def test_deleting_queue_deletes_its_subscriptions(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with api(tmp_path) as (client, _, _):
            await create_queue(client)
            await client.put("/v1/queues/jobs/subscriptions/hook", json={"endpoint": ENDPOINT})
            assert (await client.delete("/v1/queues/jobs")).status_code == 204
            await create_queue(client)
            assert (await client.get("/v1/queues/jobs/subscriptions")).json() == {"subscriptions": []}

    run(scenario)
    run(lambda: _after_restart_empty(tmp_path))


async def _after_restart_empty(tmp_path: Path) -> None:
    async with api(tmp_path) as (client, _, _):
        assert (await client.get("/v1/queues/jobs/subscriptions")).json() == {"subscriptions": []}


def test_metrics_per_subscription(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with api(tmp_path) as (client, transport, _):
            await create_queue(client)
            await client.put("/v1/queues/jobs/subscriptions/hook", json={"endpoint": ENDPOINT})
            await client.post("/v1/queues/jobs/messages", json={"messages": [{"body": i} for i in range(3)]})
            await wait_for(lambda: transport.requests)
            await asyncio.sleep(0.1)
            text = (await client.get("/metrics")).text
            labels = 'queue="jobs",subscription="hook"'
            assert f'queue_push_deliveries_total{{outcome="delivered",{labels}}} 1.0' in text
            assert f"queue_push_messages_delivered_total{{{labels}}} 3.0" in text
            assert f"queue_push_concurrency{{{labels}}}" in text
            assert f"queue_push_backlog_messages{{{labels}}} 0.0" in text
            assert f"queue_push_delivery_seconds_count{{{labels}}}" in text

    run(scenario)


async def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)
