"""Crash safety with the real server process: kill -9 under load, restart, count deliveries."""

from __future__ import annotations

import asyncio
from collections import Counter

from telemetry.queue_client import OutgoingMessage, QueueClient, QueueError, RetryPolicy

ROUNDS = 3
ROUND_S = 1.0
BATCH = 50


class Ledger:
    """What the clients saw.

    ``published``: publishes that returned 2xx. ``delivered``: every leased message.
    ``acked``: acks that returned ``acked``. ``ack_unknown``: acks whose request failed
    when the server died, so the server may or may not have stored them.
    """

    def __init__(self) -> None:
        self.next_number = 0
        self.published: set[int] = set()
        self.delivered: set[int] = set()
        self.acked: Counter[int] = Counter()
        self.ack_unknown: set[int] = set()
        self.leased_after_ack: list[int] = []

    def record_leased(self, numbers: list[int]) -> None:
        for number in numbers:
            if self.acked[number]:
                self.leased_after_ack.append(number)
        self.delivered.update(numbers)

    def take_numbers(self, count: int) -> list[int]:
        numbers = list(range(self.next_number, self.next_number + count))
        self.next_number += count
        return numbers


async def publisher(client: QueueClient, ledger: Ledger, stop: asyncio.Event) -> None:
    while not stop.is_set():
        numbers = ledger.take_numbers(BATCH)
        try:
            await client.publish("crash", [OutgoingMessage(body={"n": n}) for n in numbers])
        except QueueError:
            await asyncio.sleep(0.05)
            continue
        ledger.published.update(numbers)


async def consumer(client: QueueClient, ledger: Ledger, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            messages = await client.lease("crash", max_messages=40, wait_s=0.2)
        except QueueError:
            await asyncio.sleep(0.05)
            continue
        ledger.record_leased([m.body["n"] for m in messages])
        if not messages:
            continue
        try:
            results = await client.ack("crash", [m.receipt for m in messages])
        except QueueError:
            ledger.ack_unknown.update(m.body["n"] for m in messages)
            await asyncio.sleep(0.05)
            continue
        by_receipt = {m.receipt: m.body["n"] for m in messages}
        for result in results:
            if result.status == "acked":
                ledger.acked[by_receipt[result.receipt]] += 1


def new_client(url: str) -> QueueClient:
    return QueueClient(url, retry=RetryPolicy(max_attempts=1), timeout_s=5)


async def load_round(url: str, ledger: Ledger, server) -> None:
    stop = asyncio.Event()
    async with new_client(url) as client:
        tasks = [asyncio.create_task(publisher(client, ledger, stop)) for _ in range(2)]
        tasks += [asyncio.create_task(consumer(client, ledger, stop)) for _ in range(2)]
        await asyncio.sleep(ROUND_S)
        await asyncio.to_thread(server.kill)
        stop.set()
        await asyncio.gather(*tasks)


async def drain(url: str, ledger: Ledger) -> None:
    empty_polls = 0
    async with new_client(url) as client:
        while empty_polls < 3:
            messages = await client.lease("crash", max_messages=500, wait_s=0.3)
            if not messages:
                empty_polls += 1
                continue
            empty_polls = 0
            ledger.record_leased([m.body["n"] for m in messages])
            results = await client.ack("crash", [m.receipt for m in messages])
            by_receipt = {m.receipt: m.body["n"] for m in messages}
            for result in results:
                assert result.status == "acked", result
                ledger.acked[by_receipt[result.receipt]] += 1


def test_kill_9_under_load_loses_and_repeats_nothing(queue_server) -> None:
    ledger = Ledger()

    async def setup() -> None:
        async with new_client(queue_server.url) as client:
            await client.create_queue("crash", visibility_timeout_s=30)

    asyncio.run(setup())
    for _ in range(ROUNDS):
        asyncio.run(load_round(queue_server.url, ledger, queue_server))
        queue_server.start()
    asyncio.run(drain(queue_server.url, ledger))

    # A message may lack a confirmed ack only when its ack request failed as the server died.
    undelivered = sorted(ledger.published - ledger.delivered)
    unacked = sorted(n for n in ledger.published if not ledger.acked[n] and n not in ledger.ack_unknown)
    twice = sorted(n for n, count in ledger.acked.items() if count > 1)
    assert len(ledger.published) >= BATCH * ROUNDS
    assert undelivered == []
    assert unacked == []
    assert twice == []
    assert ledger.leased_after_ack == []
    assert queue_server.stop() == 0
