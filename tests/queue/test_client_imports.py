"""The queue client's requests import no modules once the first requests are done.

A failed import is not cached by Python: each attempt searches the file system
again. httpcore imports sniffio inside every request, so without sniffio
installed each request repeated that search. This test catches any module that
the request path looks up again and again.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import sys
from collections.abc import Sequence
from types import ModuleType

import pytest

from telemetry.queue_client import OutgoingMessage, QueueClient

QUEUE = "imports"


class RecordingFinder(importlib.abc.MetaPathFinder):
    """Records the modules that an import looks for and leaves the search to the other finders."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> None:
        self.names.append(fullname)
        return None


async def exchange(client: QueueClient, round_number: int) -> None:
    """Publish, lease and ack one message: HTTP/2 requests and an HTTP/1.1 long-poll."""
    await client.publish(QUEUE, [OutgoingMessage(body={"round": round_number})])
    leased = await client.lease(QUEUE, max_messages=10, wait_s=5)
    assert [message.body for message in leased] == [{"round": round_number}]
    results = await client.ack(QUEUE, [message.receipt for message in leased])
    assert [result.status for result in results] == ["acked"]


def test_requests_look_up_no_modules(queue_server, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> list[str]:
        async with QueueClient(queue_server.url) as client:
            await client.create_queue(QUEUE)
            # The first round imports what the request path needs once.
            await exchange(client, 0)
            finder = RecordingFinder()
            monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
            for round_number in range(1, 4):
                await exchange(client, round_number)
            return finder.names

    assert asyncio.run(main()) == []
