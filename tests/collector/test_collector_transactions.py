"""How the collector merges leased batches into transactions."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from collector.worker import Collector, CollectorConfig, _Batch
from telemetry.database import make_engine
from telemetry.queue_client import LeasedMessage, QueueClient
from telemetry.record import TelemetryRecord


def _batch(size: int) -> _Batch:
    record = TelemetryRecord(
        uuid="GPU-a",
        hostname="host-1",
        gpu_index=0,
        device="nvidia0",
        model_name="NVIDIA H100 80GB HBM3",
        metric_name="DCGM_FI_DEV_GPU_UTIL",
        value=1.0,
        timestamp=datetime(2026, 3, 1, tzinfo=UTC),
        key="k",
    )
    message = LeasedMessage(
        id="m", receipt="r", body={}, deliveries=1, published_at="2026-03-01T00:00:00Z"
    )
    return _Batch(items=[(message, record)] * size, oldest_published_at=None)


async def _transactions(
    sizes: list[int], *, end: bool = True, **options: float
) -> list[list[int]]:
    """Buffer batches of ``sizes``, then return the row counts of each transaction."""
    queue = QueueClient("http://127.0.0.1:9")
    engine = make_engine("sqlite://")
    try:
        collector = Collector(queue, engine, config=CollectorConfig(**options))
        # Unbounded here, so the whole backlog is buffered before the first take.
        collector._buffer = asyncio.Queue()
        for size in sizes:
            collector._buffer.put_nowait(_batch(size))
        if end:
            collector._buffer.put_nowait(None)
        transactions = []
        while (batches := await collector._next_transaction()) is not None:
            transactions.append([len(batch.items) for batch in batches])
            if not end and collector._buffer.empty() and not collector._carried:
                break
        return transactions
    finally:
        await queue.aclose()
        engine.dispose()


@pytest.mark.parametrize(
    ("sizes", "max_rows", "expected"),
    [
        ([1000, 1000, 1000], 5000, [[1000, 1000, 1000]]),
        ([1000] * 6, 5000, [[1000] * 5, [1000]]),
        ([600, 600, 600], 1000, [[600], [600], [600]]),
        ([400, 500, 200], 1000, [[400, 500], [200]]),
        ([1000], 1, [[1000]]),
    ],
    ids=["all-fit", "overflow-carried", "each-alone", "partial-fit", "oversized-batch"],
)
def test_merge_bounded_by_rows(sizes: list[int], max_rows: int, expected: list[list[int]]) -> None:
    transactions = asyncio.run(
        _transactions(sizes, max_transaction_rows=max_rows, max_merge_wait_s=0)
    )

    assert transactions == expected


def test_merge_waits_at_most_merge_wait() -> None:
    started = time.monotonic()

    transactions = asyncio.run(
        _transactions([100], end=False, max_transaction_rows=5000, max_merge_wait_s=0.3)
    )

    elapsed = time.monotonic() - started
    assert transactions == [[100]]
    assert elapsed >= 0.3
    assert elapsed < 5


def test_merge_takes_batch_arriving_during_wait() -> None:
    async def scenario() -> list[int]:
        queue = QueueClient("http://127.0.0.1:9")
        engine = make_engine("sqlite://")
        try:
            collector = Collector(
                queue,
                engine,
                config=CollectorConfig(max_transaction_rows=5000, max_merge_wait_s=2),
            )
            collector._buffer.put_nowait(_batch(100))
            asyncio.get_running_loop().call_later(0.1, collector._buffer.put_nowait, _batch(200))
            asyncio.get_running_loop().call_later(0.2, collector._buffer.put_nowait, None)
            batches = await collector._next_transaction()
            assert batches is not None
            assert await collector._next_transaction() is None
            return [len(batch.items) for batch in batches]
        finally:
            await queue.aclose()
            engine.dispose()

    assert asyncio.run(scenario()) == [100, 200]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_transaction_rows": 0}, "max_transaction_rows=0"),
        ({"max_merge_wait_s": -1}, "max_merge_wait_s=-1"),
        ({"max_merge_wait_s": 11}, "max_merge_wait_s=11"),
    ],
    ids=["zero-rows", "negative-wait", "long-wait"],
)
def test_merge_options_validated(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CollectorConfig(**options)
