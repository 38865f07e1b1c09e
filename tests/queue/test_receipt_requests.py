"""Ack, nack and extend requests carry up to 10,000 receipts, and the client splits longer lists."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from telemetry import queue_client
from telemetry.queue_client import OutgoingMessage, QueueClient

QUEUE = "receipts"


async def fill(client: QueueClient, count: int) -> list[str]:
    """Publish ``count`` messages, lease them all and return their receipts in lease order."""
    await client.create_queue(QUEUE, visibility_timeout_s=60)
    for start in range(0, count, 1000):
        await client.publish(QUEUE, [OutgoingMessage(body={"i": i}) for i in range(start, min(count, start + 1000))])
    receipts: list[str] = []
    while len(receipts) < count:
        leased = await client.lease(QUEUE, max_messages=1000, wait_s=1)
        receipts.extend(message.receipt for message in leased)
    return receipts


def test_one_request_acks_several_leases(queue_server) -> None:
    async def main() -> tuple[httpx.Response, httpx.Response, dict[str, Any]]:
        async with QueueClient(queue_server.url) as client:
            receipts = await fill(client, 2500)
            async with httpx.AsyncClient(base_url=queue_server.url) as http:
                too_many = await http.post(f"/v1/queues/{QUEUE}/acks", json={"receipts": ["x"] * 10_001})
                acked = await http.post(f"/v1/queues/{QUEUE}/acks", json={"receipts": receipts})
            return too_many, acked, await client.get_queue(QUEUE)

    too_many, acked, queue = asyncio.run(main())

    assert too_many.status_code == 400
    assert "expected a list of 1 to 10000 receipt strings" in too_many.json()["detail"]
    assert acked.status_code == 200
    assert [result["status"] for result in acked.json()["results"]] == ["acked"] * 2500
    assert queue["stats"]["acked_total"] == 2500
    assert queue["stats"]["leased"] == 0


def test_client_splits_long_receipt_lists(queue_server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_client, "MAX_RECEIPTS_PER_REQUEST", 4)
    sent: list[int] = []

    async def count_receipts(request: httpx.Request) -> None:
        if request.url.path.endswith(("/acks", "/nacks", "/extend")):
            sent.append(len(orjson.loads(request.content)["receipts"]))

    async def main() -> tuple[list[str], list[str], list[str], list[str], dict[str, Any]]:
        async with QueueClient(queue_server.url) as client:
            client._nodes[0].client.event_hooks["request"].append(count_receipts)
            receipts = await fill(client, 10)
            extended = await client.extend(QUEUE, receipts, visibility_timeout_s=120)
            nacked = await client.nack(QUEUE, receipts[:9] + ["not-a-receipt"], delay_s=30)
            acked = await client.ack(QUEUE, [receipts[9]])
            nothing = await client.ack(QUEUE, [])
            queue = await client.get_queue(QUEUE)
        return (
            [result.receipt for result in extended],
            [result.status for result in nacked],
            [result.status for result in acked + nothing],
            receipts,
            queue,
        )

    extended, nacked, acked, receipts, queue = asyncio.run(main())

    assert extended == receipts, "results come back in the order of the receipts"
    assert nacked == ["nacked"] * 9 + ["invalid"]
    assert acked == ["acked"]
    assert sent == [4, 4, 2, 4, 4, 2, 1], "10 receipts in requests of 4, and no request for an empty list"
    assert queue["stats"]["delayed"] == 9, "every request of a split nack carries its delay"


def test_receipt_listed_twice_is_applied_once(queue_server) -> None:
    async def main() -> tuple[httpx.Response, httpx.Response, dict[str, Any]]:
        async with QueueClient(queue_server.url) as client:
            receipts = await fill(client, 3)
            async with httpx.AsyncClient(base_url=queue_server.url) as http:
                acked = await http.post(f"/v1/queues/{QUEUE}/acks", json={"receipts": [receipts[0], receipts[0]]})
                moved = await http.post(
                    f"/v1/queues/{QUEUE}/nacks",
                    json={"receipts": [receipts[1], receipts[1]], "dead_letter": True, "reason": "test"},
                )
            return acked, moved, await client.get_queue(QUEUE)

    acked, moved, queue = asyncio.run(main())

    assert acked.status_code == 200
    assert moved.status_code == 200
    assert [result["status"] for result in acked.json()["results"]] == ["acked", "not_found"]
    assert [result["status"] for result in moved.json()["results"]] == ["dead_lettered", "not_found"]
    stats = queue["stats"]
    assert (stats["acked_total"], stats["dead_lettered_total"], stats["leased"]) == (1, 1, 1)
