"""The HTTP API in-process: httpx over ASGITransport, a real service on a temporary directory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from queue_server.auth import Tokens, parse_tokens
from queue_server.http.app import create_app
from queue_server.service import QueueService, ServiceOptions
from queue_server.wal.log import FsyncPolicy

Scenario = Callable[[httpx.AsyncClient, QueueService], Awaitable[None]]


@asynccontextmanager
async def api(
    data_dir: Path, *, tokens: Tokens | None = None, min_free_bytes: int = 0, headers: dict[str, str] | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, QueueService]]:
    service = QueueService(ServiceOptions(data_dir=data_dir, fsync=FsyncPolicy.ALWAYS, min_free_bytes=min_free_bytes))
    service.open()
    await service.start()
    app = create_app(service, tokens or Tokens({}))
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://queue.test", headers=headers) as client:
            yield client, service
    finally:
        await service.close()


def run(data_dir: Path, scenario: Scenario, **options: Any) -> None:
    async def main() -> None:
        async with api(data_dir, **options) as (client, service):
            await scenario(client, service)

    asyncio.run(main())


async def publish(client: httpx.AsyncClient, queue: str, bodies: list[Any], **extra: Any) -> list[dict[str, Any]]:
    messages = [{"body": body, **extra} for body in bodies]
    response = await client.post(f"/v1/queues/{queue}/messages", json={"messages": messages})
    assert response.status_code == 200, response.text
    return response.json()["results"]


async def lease(client: httpx.AsyncClient, queue: str, **fields: Any) -> list[dict[str, Any]]:
    response = await client.post(f"/v1/queues/{queue}/leases", json={"max_messages": 100, **fields})
    assert response.status_code == 200, response.text
    return response.json()["messages"]


async def stats(client: httpx.AsyncClient, queue: str) -> dict[str, Any]:
    return (await client.get(f"/v1/queues/{queue}")).json()["stats"]


def test_queue_lifecycle(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        created = await client.put("/v1/queues/jobs", json={"visibility_timeout_s": 5})
        updated = await client.put("/v1/queues/jobs", json={"max_messages": 10})
        listed = await client.get("/v1/queues")
        deleted = await client.delete("/v1/queues/jobs")
        missing = await client.get("/v1/queues/jobs")
        assert created.status_code == 201
        assert created.json()["dead_letter_queue"] == "jobs.dlq"
        assert updated.status_code == 200
        assert updated.json()["visibility_timeout_s"] == 5
        assert updated.json()["max_messages"] == 10
        assert sorted(q["name"] for q in listed.json()["queues"]) == ["jobs", "jobs.dlq"]
        assert deleted.status_code == 204
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"

    run(tmp_path, scenario)


def test_publish_lease_ack_shapes(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={})
        results = await publish(client, "jobs", [{"gpu": 1}, "text", None, [1, 2.5]])
        messages = await lease(client, "jobs")
        acks = await client.post("/v1/queues/jobs/acks", json={"receipts": [m["receipt"] for m in messages]})
        assert [r["duplicate"] for r in results] == [False] * 4
        assert [m["body"] for m in messages] == [{"gpu": 1}, "text", None, [1, 2.5]]
        assert [m["id"] for m in messages] == [r["id"] for r in results]
        assert all(m["deliveries"] == 1 for m in messages)
        assert messages[0]["published_at"].endswith("Z")
        assert [r["status"] for r in acks.json()["results"]] == ["acked"] * 4
        assert (await stats(client, "jobs"))["acked_total"] == 4

    run(tmp_path, scenario)


def test_long_poll_wakes_on_publish(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={})
        waiting = asyncio.create_task(lease(client, "jobs", wait_s=5))
        await asyncio.sleep(0.1)
        assert service.long_polls == 1
        await publish(client, "jobs", ["hello"])
        messages = await asyncio.wait_for(waiting, 2)
        assert [m["body"] for m in messages] == ["hello"]

    run(tmp_path, scenario)


def test_long_poll_returns_empty_after_wait(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={})
        assert await lease(client, "jobs", wait_s=0.2) == []

    run(tmp_path, scenario)


def test_shutdown_answers_waiting_long_poll(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={})
        waiting = asyncio.create_task(lease(client, "jobs", wait_s=10))
        await asyncio.sleep(0.1)
        service.begin_shutdown()
        assert await asyncio.wait_for(waiting, 2) == []
        refused = await client.post("/v1/queues/jobs/messages", json={"messages": [{"body": 1}]})
        assert refused.status_code == 503
        assert (await client.get("/readyz")).status_code == 503

    run(tmp_path, scenario)


def test_receipt_statuses(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={"visibility_timeout_s": 0.1})
        await publish(client, "jobs", ["a", "b"])
        first = await lease(client, "jobs", max_messages=1)
        await asyncio.sleep(0.3)
        again = await lease(client, "jobs", max_messages=2)
        redelivered = next(m for m in again if m["id"] == first[0]["id"])
        stale = await client.post("/v1/queues/jobs/acks", json={"receipts": [first[0]["receipt"], "junk"]})
        extended = await client.post(
            "/v1/queues/jobs/extend", json={"receipts": [redelivered["receipt"]], "visibility_timeout_s": 30}
        )
        acked = await client.post("/v1/queues/jobs/acks", json={"receipts": [redelivered["receipt"]]})
        gone = await client.post("/v1/queues/jobs/acks", json={"receipts": [redelivered["receipt"]]})
        assert redelivered["deliveries"] == 2
        assert [r["status"] for r in stale.json()["results"]] == ["stale", "invalid"]
        assert extended.json()["results"][0]["status"] == "extended"
        assert acked.json()["results"][0]["status"] == "acked"
        assert gone.json()["results"][0]["status"] == "not_found"
        assert (await stats(client, "jobs"))["redelivered_total"] == 1

    run(tmp_path, scenario)


def test_dead_letter_after_max_deliveries_and_redrive(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={"visibility_timeout_s": 0.05, "max_deliveries": 2})
        [published] = await publish(client, "jobs", ["poison"])
        for _ in range(2):
            assert len(await lease(client, "jobs", wait_s=2)) == 1
        dead = await lease(client, "jobs.dlq", wait_s=3)
        assert [m["body"] for m in dead] == ["poison"]
        assert dead[0]["dead_letter"] == {"queue": "jobs", "id": published["id"], "deliveries": 2, "reason": "max_deliveries"}
        assert (await stats(client, "jobs"))["dead_lettered_total"] == 1
        nacked = await client.post("/v1/queues/jobs.dlq/nacks", json={"receipts": [dead[0]["receipt"]]})
        assert nacked.json()["results"][0]["status"] == "nacked"
        redriven = await client.post("/v1/queues/jobs.dlq/redrive", json={})
        assert redriven.json() == {"redriven": 1}
        back = await lease(client, "jobs", wait_s=2, visibility_timeout_s=30)
        assert [m["body"] for m in back] == ["poison"]
        assert back[0]["deliveries"] == 1

    run(tmp_path, scenario)


def test_nack_dead_letter_with_reason(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={})
        await publish(client, "jobs", ["bad"])
        [message] = await lease(client, "jobs")
        response = await client.post(
            "/v1/queues/jobs/nacks", json={"receipts": [message["receipt"]], "dead_letter": True, "reason": "invalid_json"}
        )
        assert response.json()["results"][0]["status"] == "dead_lettered"
        [dead] = await lease(client, "jobs.dlq")
        assert dead["dead_letter"]["reason"] == "invalid_json"
        assert dead["dead_letter"]["deliveries"] == 1

    run(tmp_path, scenario)


def test_nack_delay_and_delayed_publish(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={})
        await publish(client, "jobs", ["later"], delay_s=0.3)
        assert await lease(client, "jobs") == []
        assert (await stats(client, "jobs"))["delayed"] == 1
        [message] = await lease(client, "jobs", wait_s=3)
        await client.post("/v1/queues/jobs/nacks", json={"receipts": [message["receipt"]], "delay_s": 0.3})
        assert await lease(client, "jobs") == []
        [again] = await lease(client, "jobs", wait_s=3)
        assert again["deliveries"] == 2

    run(tmp_path, scenario)


def test_state_survives_restart(tmp_path: Path) -> None:
    state: dict[str, Any] = {}

    async def before(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={"max_deliveries": 3})
        state["first"] = await publish(client, "jobs", ["a", "b", "c"], key="same")
        await publish(client, "jobs", ["d", "e"])
        messages = await lease(client, "jobs", max_messages=2)
        await client.post("/v1/queues/jobs/acks", json={"receipts": [messages[0]["receipt"]]})
        state["acked"] = messages[0]["id"]

    async def after(client: httpx.AsyncClient, service: QueueService) -> None:
        config = (await client.get("/v1/queues/jobs")).json()
        duplicate = await publish(client, "jobs", ["a"], key="same")
        messages = await lease(client, "jobs")
        assert config["max_deliveries"] == 3
        assert duplicate == [{"id": state["first"][0]["id"], "duplicate": True}]
        assert state["acked"] not in [m["id"] for m in messages]
        assert sorted(m["body"] for m in messages) == ["d", "e"]
        assert [m["deliveries"] for m in messages if m["body"] == "d"] == [2]

    run(tmp_path, before)
    run(tmp_path, after)


async def expect_problem(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert fragment in problem["detail"]


def test_client_errors_leave_state_unchanged(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={"max_messages": 3})
        url = "/v1/queues/jobs/messages"
        await expect_problem(await client.post("/v1/queues/nope/messages", json={"messages": [{"body": 1}]}), 404, "'nope'")
        await expect_problem(await client.post(url, content=b"{not json"), 400, "not valid JSON")
        await expect_problem(await client.post(url, json={"messages": [{"bdy": 1}]}), 400, "'bdy'")
        await expect_problem(await client.post(url, json={"messages": []}), 400, "messages=[]")
        await expect_problem(await client.post(url, json={"messages": [{"body": 1, "key": 5}]}), 400, "key=5")
        await expect_problem(await client.post(url, json={"messages": [{"body": 1, "delay_s": -1}]}), 400, "delay_s=-1")
        await expect_problem(await client.post(url, json={"messages": [{"body": i} for i in range(1001)]}), 400, "1000")
        await expect_problem(await client.post(url, content=b"x" * (4 * 1024 * 1024 + 1)), 413, "limit")
        full = await client.post(url, json={"messages": [{"body": i} for i in range(4)]})
        await expect_problem(full, 429, "max_messages")
        assert full.headers["retry-after"] == "1"
        await expect_problem(await client.put("/v1/queues/bad name!", json={}), 400, "'bad name!'")
        await expect_problem(await client.put("/v1/queues/jobs", json={"max_deliveries": 0}), 400, "max_deliveries=0")
        await expect_problem(await client.post("/v1/queues/jobs/leases", json={"wait_s": 21}), 400, "wait_s=21")
        await expect_problem(await client.post("/v1/queues/jobs/leases", json={"max_messages": 0}), 400, "max_messages=0")
        await expect_problem(await client.post("/v1/queues/jobs/acks", json={"receipts": "r"}), 400, "receipts='r'")
        await expect_problem(await client.post("/v1/queues/jobs/extend", json={"receipts": ["r"]}), 400, "visibility_timeout_s")
        assert await stats(client, "jobs") == {
            "ready": 0, "leased": 0, "delayed": 0, "oldest_ready_age_s": 0.0,
            "published_total": 0, "acked_total": 0, "redelivered_total": 0, "dead_lettered_total": 0,
        }
        assert (await client.get("/v1/queues/jobs")).json()["max_deliveries"] == 5

    run(tmp_path, scenario)


def test_disk_nearly_full_answers_507(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={})
        response = await client.post("/v1/queues/jobs/messages", json={"messages": [{"body": 1}]})
        await expect_problem(response, 507, "free")
        assert response.headers["retry-after"] == "5"
        assert (await stats(client, "jobs"))["ready"] == 0

    run(tmp_path, scenario, min_free_bytes=2**62)


TOKENS = "publish:pub;consume:con;admin:adm;publish,consume,admin:all"


@pytest.mark.parametrize(
    ("token", "method", "path", "body", "status"),
    [
        (None, "GET", "/v1/queues", None, 401),
        ("wrong", "GET", "/v1/queues", None, 401),
        ("pub", "GET", "/v1/queues/jobs", None, 200),
        ("pub", "POST", "/v1/queues/jobs/messages", {"messages": [{"body": 1}]}, 200),
        ("con", "POST", "/v1/queues/jobs/messages", {"messages": [{"body": 1}]}, 403),
        ("con", "POST", "/v1/queues/jobs/leases", {}, 200),
        ("pub", "POST", "/v1/queues/jobs/leases", {}, 403),
        ("pub", "POST", "/v1/queues/jobs/acks", {"receipts": ["x"]}, 403),
        ("con", "PUT", "/v1/queues/other", {}, 403),
        ("adm", "PUT", "/v1/queues/other", {}, 201),
        ("adm", "DELETE", "/v1/queues/jobs", None, 204),
        ("con", "POST", "/v1/queues/jobs.dlq/redrive", {}, 403),
        (None, "GET", "/healthz", None, 200),
        (None, "GET", "/metrics", None, 200),
    ],
    ids=[
        "no-token", "unknown-token", "any-token-reads", "publish-scope", "consume-cannot-publish",
        "consume-leases", "publish-cannot-lease", "publish-cannot-ack", "consume-cannot-admin",
        "admin-creates", "admin-deletes", "consume-cannot-redrive", "health-open", "metrics-open",
    ],
)
def test_auth_scopes(tmp_path: Path, token: str | None, method: str, path: str, body: Any, status: int) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        setup = await client.put("/v1/queues/jobs", json={}, headers={"authorization": "Bearer all"})
        assert setup.status_code == 201
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        content = None if body is None else orjson.dumps(body)
        response = await client.request(method, path, content=content, headers=headers)
        assert response.status_code == status, response.text

    run(tmp_path, scenario, tokens=parse_tokens(TOKENS, source="test"))


def test_metrics_expose_queue_state(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, service: QueueService) -> None:
        await client.put("/v1/queues/jobs", json={})
        await publish(client, "jobs", [1, 2, 3])
        await lease(client, "jobs", max_messages=1)
        text = (await client.get("/metrics")).text
        assert 'queue_ready_messages{queue="jobs"} 2.0' in text
        assert 'queue_leased_messages{queue="jobs"} 1.0' in text
        assert 'queue_published_total{queue="jobs"} 3.0' in text
        assert "queue_wal_fsync_seconds_count" in text
        assert "queue_wal_bytes" in text
        assert "queue_waiting_long_polls 0.0" in text
        assert 'queue_oldest_ready_age_seconds{queue="jobs"}' in text

    run(tmp_path, scenario)
