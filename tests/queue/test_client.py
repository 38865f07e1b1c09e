"""The queue client against mocked HTTP (respx) and against the in-process app."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType

import httpx
import msgspec
import orjson
import pytest
import respx

from queue_server.auth import Tokens
from queue_server.http.app import create_app
from queue_server.service import QueueService, ServiceOptions
from telemetry import queue_client
from telemetry.queue_client import (
    OutgoingMessage,
    QueueClient,
    QueueError,
    QueueNotFound,
    QueueRequestError,
    QueueUnavailable,
    RetryPolicy,
)

URL = "http://127.0.0.1:8500"
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the client's retry sleeps instead of sleeping."""
    recorded: list[float] = []

    async def fake_sleep(delay: float) -> None:
        recorded.append(delay)

    monkeypatch.setattr(queue_client.asyncio, "sleep", fake_sleep)
    return recorded


def problem(status: int, detail: str, **headers: str) -> httpx.Response:
    body = {"type": "about:blank", "title": "x", "status": status, "detail": detail}
    return httpx.Response(status, json=body, headers=headers)


@respx.mock
def test_retries_429_honouring_retry_after(sleeps: list[float]) -> None:
    route = respx.post(f"{URL}/v1/queues/q/messages").mock(
        side_effect=[
            problem(429, "queue full", **{"retry-after": "3"}),
            httpx.Response(200, json={"results": [{"id": "1-0", "duplicate": False}]}),
        ]
    )

    async def scenario() -> None:
        async with QueueClient(URL, retry=FAST, http2=False) as client:
            results = await client.publish("q", [OutgoingMessage(body=1, key="k")])
            assert results[0].id == "1-0"

    asyncio.run(scenario())
    assert route.call_count == 2
    assert sleeps == [3.0]


@respx.mock
def test_retry_after_http_date(sleeps: list[float]) -> None:
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    respx.get(f"{URL}/v1/queues/q").mock(
        side_effect=[problem(503, "busy", **{"retry-after": later}), httpx.Response(200, json={"name": "q"})]
    )

    async def scenario() -> None:
        async with QueueClient(URL, retry=FAST, http2=False) as client:
            await client.get_queue("q")

    asyncio.run(scenario())
    assert 25 < sleeps[0] <= 30


@respx.mock
def test_gives_up_after_max_attempts(sleeps: list[float]) -> None:
    route = respx.post(f"{URL}/v1/queues/q/acks").mock(return_value=problem(507, "disk nearly full"))

    async def scenario() -> None:
        async with QueueClient(URL, retry=FAST, http2=False) as client:
            with pytest.raises(QueueUnavailable, match="disk nearly full") as error:
                await client.ack("q", ["r"])
            assert error.value.status == 507

    asyncio.run(scenario())
    assert route.call_count == 4
    assert len(sleeps) == 3


@respx.mock
def test_transport_errors_are_retried(sleeps: list[float]) -> None:
    route = respx.get(f"{URL}/v1/queues").mock(
        side_effect=[httpx.ConnectError("refused"), httpx.Response(200, json={"queues": []})]
    )

    async def scenario() -> None:
        async with QueueClient(URL, retry=FAST, http2=False) as client:
            assert await client.list_queues() == []

    asyncio.run(scenario())
    assert route.call_count == 2


@respx.mock
def test_404_raises_queue_not_found_without_retry(sleeps: list[float]) -> None:
    route = respx.post(f"{URL}/v1/queues/missing/leases").mock(return_value=problem(404, "queue 'missing' does not exist"))

    async def scenario() -> None:
        async with QueueClient(URL, retry=FAST, http2=False) as client:
            with pytest.raises(QueueNotFound, match="'missing'") as error:
                await client.lease("missing", wait_s=0)
            assert error.value.problem["status"] == 404

    asyncio.run(scenario())
    assert route.call_count == 1
    assert sleeps == []


@respx.mock
def test_400_raises_request_error(sleeps: list[float]) -> None:
    respx.put(f"{URL}/v1/queues/q").mock(return_value=problem(400, "max_deliveries=0 is invalid"))

    async def scenario() -> None:
        async with QueueClient(URL, retry=FAST, http2=False) as client:
            with pytest.raises(QueueRequestError, match="max_deliveries=0") as error:
                await client.create_queue("q", max_deliveries=0)
            assert error.value.status == 400
            assert not isinstance(error.value, QueueNotFound)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("method", "path", "call"),
    [
        ("GET", "/v1/queues/q", lambda client: client.get_queue("q")),
        ("POST", "/v1/queues/q/leases", lambda client: client.lease("q", wait_s=0, body_type=Point)),
    ],
    ids=["get-queue", "typed-lease"],
)
@respx.mock
def test_non_json_success_raises_queue_error(
    method: str, path: str, call: Callable[[QueueClient], Awaitable[object]]
) -> None:
    respx.route(method=method, url=f"{URL}{path}").mock(
        return_value=httpx.Response(200, text="<html>proxy</html>")
    )

    async def scenario() -> None:
        async with QueueClient(URL, retry=FAST, http2=False) as client:
            with pytest.raises(QueueError, match="not JSON"):
                await call(client)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(200, text="<html>proxy</html>"), "not JSON"),
        (httpx.Response(200, json={"results": [{"receipt": "r"}]}), "unexpected response body"),
        (httpx.Response(200, json={"status": "ok"}), "unexpected response body"),
        (httpx.Response(204), "unexpected response body"),
    ],
)
@respx.mock
def test_unexpected_ack_response_raises_queue_error(response: httpx.Response, message: str) -> None:
    respx.post(f"{URL}/v1/queues/q/acks").mock(return_value=response)

    async def scenario() -> None:
        async with QueueClient(URL, retry=FAST, http2=False) as client:
            with pytest.raises(QueueError, match=message):
                await client.ack("q", ["r"])

    asyncio.run(scenario())


@respx.mock
def test_long_poll_read_timeout_covers_wait() -> None:
    route = respx.post(f"{URL}/v1/queues/q/leases").mock(return_value=httpx.Response(200, json={"messages": []}))

    async def scenario() -> None:
        async with QueueClient(URL, retry=FAST, http2=False, timeout_s=1) as client:
            await client.lease("q", wait_s=20)

    asyncio.run(scenario())
    assert route.calls[0].request.extensions["timeout"]["read"] >= 20


def test_urls_hash_queues_to_nodes() -> None:
    client = QueueClient("http://127.0.0.1:1, http://127.0.0.1:2")
    assert client.urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert {client._node_for(f"q{i}").url for i in range(20)} == set(client.urls)
    asyncio.run(client.aclose())
    with pytest.raises(ValueError, match="at least one"):
        QueueClient([])


def test_client_against_in_process_app(tmp_path: Path) -> None:
    async def scenario() -> None:
        service = QueueService(ServiceOptions(data_dir=tmp_path, min_free_bytes=0))
        service.open()
        await service.start()
        transport = httpx.ASGITransport(app=create_app(service, Tokens({})))
        try:
            async with QueueClient("http://queue.test", transport=transport, retry=FAST) as client:
                await client.create_queue("jobs", visibility_timeout_s=60)
                await client.publish("jobs", [OutgoingMessage(body={"i": i}, key=f"k{i}") for i in range(3)])
                again = await client.publish("jobs", [OutgoingMessage(body={"i": 0}, key="k0")])
                messages = await client.lease("jobs", max_messages=3, wait_s=0)
                nacked = await client.nack("jobs", [messages[0].receipt], dead_letter=True, reason="bad")
                extended = await client.extend("jobs", [messages[1].receipt], visibility_timeout_s=120)
                acked = await client.ack("jobs", [messages[2].receipt])
                redriven = await client.redrive("jobs.dlq")
                queues = {q["name"]: q for q in await client.list_queues()}
                await client.delete_queue("jobs")
                with pytest.raises(QueueNotFound):
                    await client.get_queue("jobs")
            assert again[0].duplicate is True
            assert [r.status for r in nacked + extended + acked] == ["dead_lettered", "extended", "acked"]
            assert all(r.ok for r in nacked + extended + acked)
            assert redriven == 1
            assert queues["jobs"]["stats"]["ready"] == 1
        finally:
            await service.close()

    asyncio.run(scenario())


class Point(msgspec.Struct, forbid_unknown_fields=True):
    x: int
    y: int


def test_typed_lease_decodes_valid_bodies(tmp_path: Path) -> None:
    bodies = [{"x": 1, "y": 2}, {"x": "1", "y": 2}, {"x": 3}, "text", {"x": 4, "y": 5}]

    async def scenario() -> None:
        service = QueueService(ServiceOptions(data_dir=tmp_path, min_free_bytes=0))
        service.open()
        await service.start()
        transport = httpx.ASGITransport(app=create_app(service, Tokens({})))
        try:
            async with QueueClient("http://queue.test", transport=transport, retry=FAST) as client:
                await client.create_queue("points")
                await client.publish("points", [OutgoingMessage(body=body) for body in bodies])
                mixed = await client.lease("points", max_messages=5, wait_s=0, body_type=Point)
                await client.nack("points", [message.receipt for message in mixed])
                plain = await client.lease("points", max_messages=5, wait_s=0)
                await client.ack("points", [message.receipt for message in plain])
                await client.publish("points", [OutgoingMessage(body=bodies[0])])
                typed = await client.lease("points", max_messages=5, wait_s=0, body_type=Point)
        finally:
            await service.close()

        # One invalid body makes the client decode each body on its own.
        assert [message.body for message in mixed] == [Point(1, 2), *bodies[1:4], Point(4, 5)]
        assert [message.body for message in plain] == bodies
        assert [message.id for message in plain] == [message.id for message in mixed]
        assert all(message.deliveries == 2 for message in plain)
        assert [message.body for message in typed] == [Point(1, 2)]
        assert typed[0].published_at.endswith("Z")

    asyncio.run(scenario())


@respx.mock
def test_publish_sends_mappings_and_messages_alike() -> None:
    route = respx.post(f"{URL}/v1/queues/q/messages").mock(
        return_value=httpx.Response(
            200, json={"results": [{"id": f"1-{n}", "duplicate": False} for n in range(3)]}
        )
    )
    as_dict = {"body": {"v": 1}, "key": "a"}

    async def scenario() -> None:
        async with QueueClient(URL, retry=FAST, http2=False) as client:
            await client.publish(
                "q",
                [
                    as_dict,
                    MappingProxyType({"body": {"v": 2}, "key": "b", "delay_s": 1.5}),
                    OutgoingMessage(body={"v": 3}, key="c"),
                ],
            )

    asyncio.run(scenario())

    sent = orjson.loads(route.calls[0].request.content)
    assert sent == {
        "messages": [
            {"body": {"v": 1}, "key": "a"},
            {"body": {"v": 2}, "key": "b", "delay_s": 1.5},
            {"body": {"v": 3}, "key": "c"},
        ]
    }
    assert as_dict == {"body": {"v": 1}, "key": "a"}
