"""The queue client leaves as little as possible to Python's cyclic garbage collector.

Its per-message results are not tracked by the collector, and its requests
leave no reference cycles that keep request or response bodies in memory.

A collector keeps thousands of leased messages at a time. Each tracked object
created counts towards the next collection, and each collection of an older
generation walks every tracked object alive. Tracked message structs cost a
collector process about a tenth of its throughput in an ad-hoc in-process
measurement. Decoded JSON cannot form reference cycles, so the structs opt out.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import httpx
import pytest

from telemetry.queue_client import OutgoingMessage, QueueClient
from telemetry.record import DecodedRecord

QUEUE = "untracked"

BODY = {
    "uuid": "GPU-1", "hostname": "host-1", "gpu_index": 0, "device": "nvidia0",
    "model_name": "NVIDIA H100 80GB HBM3", "metric_name": "DCGM_FI_DEV_GPU_UTIL", "value": 1.0,
    "labels": {"gpu": "0"}, "timestamp": "2026-01-01T00:00:00Z", "key": "k1",
}


def test_message_results_untracked(queue_server) -> None:
    async def main() -> None:
        async with QueueClient(queue_server.url) as client:
            await client.create_queue(QUEUE)
            published = await client.publish(QUEUE, [OutgoingMessage(body=BODY), OutgoingMessage(body=[1])])
            leased = await client.lease(QUEUE, max_messages=10, wait_s=5, body_type=DecodedRecord)
            acked = await client.ack(QUEUE, [message.receipt for message in leased])

        assert len(published) == 2
        assert len(leased) == 2
        assert isinstance(leased[0].body, DecodedRecord)
        assert leased[1].body == [1]
        assert [result.status for result in acked] == ["acked", "acked"]
        for item in [*published, *leased, *acked, leased[0].body]:
            assert not gc.is_tracked(item), f"{type(item).__name__} is tracked by the garbage collector"

    asyncio.run(main())


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """Disable automatic collection; a ``gc.collect()`` in the test saves what it finds in the list."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1"])
def test_requests_leave_no_response_cycles(queue_server, saved_garbage: list[object], http2: bool) -> None:
    async def main() -> None:
        async with QueueClient(queue_server.url, http2=http2) as client:
            await client.create_queue(QUEUE)
            gc.collect()
            saved_garbage.clear()
            for _ in range(3):
                await client.publish(QUEUE, [OutgoingMessage(body=BODY)] * 100)
                leased = await client.lease(QUEUE, max_messages=100, wait_s=5, body_type=DecodedRecord)
                await client.ack(QUEUE, [message.receipt for message in leased])
            gc.collect()

    asyncio.run(main())

    left = sorted({type(item).__name__ for item in saved_garbage if type(item).__module__.startswith("httpx")})
    assert left == [], f"httpx objects freed only by the cyclic garbage collector: {left}"
