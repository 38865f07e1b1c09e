"""The pull loop against a real queue server process and real databases."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from collector.storage import store_records
from collector.worker import Collector, CollectorConfig
from telemetry.database import make_engine
from telemetry.queue_client import OutgoingMessage, QueueClient, RetryPolicy
from telemetry.record import TELEMETRY_QUEUE, TelemetryRecord
from telemetry.tables import TelemetrySample

DEAD_LETTER_QUEUE = f"{TELEMETRY_QUEUE}.dlq"


def _client(queue_url: str) -> QueueClient:
    return QueueClient(queue_url, retry=RetryPolicy(max_attempts=3, max_backoff_s=0.5))


async def _publish(queue_url: str, bodies: Iterable[Any]) -> None:
    messages = [
        OutgoingMessage(body=body.to_body(), key=body.key)
        if isinstance(body, TelemetryRecord)
        else OutgoingMessage(body=body)
        for body in bodies
    ]
    async with _client(queue_url) as queue:
        await queue.create_queue(TELEMETRY_QUEUE)
        for start in range(0, len(messages), 1000):
            await queue.publish(TELEMETRY_QUEUE, messages[start : start + 1000])


async def _stats(queue_url: str, name: str = TELEMETRY_QUEUE) -> dict[str, Any]:
    async with _client(queue_url) as queue:
        return dict((await queue.get_queue(name))["stats"])


def _settled(queue_url: str, *, acked: int, dead_lettered: int) -> Callable[[], Awaitable[bool]]:
    """Return a condition that is true once the queue has counted these acks and dead letters."""

    async def condition() -> bool:
        stats = await _stats(queue_url)
        return stats["acked_total"] == acked and stats["dead_lettered_total"] == dead_lettered

    return condition


def _sample_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(select(func.count()).select_from(TelemetrySample)).scalar_one()
        )


def _distinct_keys(engine: Engine) -> int:
    with engine.connect() as connection:
        column = TelemetrySample.__table__.c.idempotency_key  # type: ignore[attr-defined]
        return int(connection.execute(select(func.count(column.distinct()))).scalar_one())


async def _run_until(
    collector: Collector, condition: Callable[[], Awaitable[bool]], timeout_s: float = 60.0
) -> None:
    """Run the collector until ``condition`` holds, then stop it cleanly."""
    task = asyncio.create_task(collector.run())
    try:
        async with asyncio.timeout(timeout_s):
            while not await condition():
                if task.done():
                    task.result()
                    raise AssertionError("collector stopped before the condition held")
                await asyncio.sleep(0.05)
    finally:
        collector.request_stop()
        await asyncio.wait_for(task, 30)


def _config(**overrides: Any) -> CollectorConfig:
    options: dict[str, Any] = {"wait_s": 0.5, "initial_backoff_s": 0.05, "max_backoff_s": 0.5}
    options.update(overrides)
    return CollectorConfig(**options)


def test_collector_drains_real_csv(
    queue_url: str, engine: Engine, real_records: list[TelemetryRecord]
) -> None:
    async def scenario() -> None:
        await _publish(queue_url, real_records)
        async with _client(queue_url) as queue:
            collector = Collector(queue, engine, config=_config())

            async def drained() -> bool:
                return _sample_count(engine) == len(real_records)

            await _run_until(collector, drained)
            stats = await _stats(queue_url)

        assert stats["ready"] == 0
        assert stats["leased"] == 0
        assert stats["acked_total"] == len(real_records)
        metrics = collector.metrics
        assert metrics.messages_stored._value.get() == len(real_records)
        assert metrics.duplicates_ignored._value.get() == 0
        assert metrics.batch_commit_seconds._sum.get() > 0

    asyncio.run(scenario())


def test_poison_messages_dead_lettered(
    queue_url: str, engine: Engine, real_records: list[TelemetryRecord]
) -> None:
    neighbours = real_records[:300]
    extra_field = {**neighbours[0].to_body(), "key": "extra", "unexpected": 1}
    poison: list[Any] = [{"uuid": "GPU-x"}, "not json {", [1, 2], extra_field]
    bodies: list[Any] = neighbours[:100] + poison[:2] + neighbours[100:200] + poison[2:]
    bodies += neighbours[200:]

    async def scenario() -> None:
        await _publish(queue_url, bodies)
        async with _client(queue_url) as queue:
            collector = Collector(queue, engine, config=_config(batch_size=250))

            await _run_until(collector, _settled(queue_url, acked=300, dead_lettered=4))
            dead = await queue.lease(DEAD_LETTER_QUEUE, max_messages=10, wait_s=0)

        assert _sample_count(engine) == 300
        assert sorted(map(repr, (message.body for message in dead))) == sorted(map(repr, poison))
        rejected = collector.metrics.messages_rejected
        assert rejected.labels("missing_field")._value.get() == 1
        assert rejected.labels("invalid_json")._value.get() == 1
        assert rejected.labels("not_an_object")._value.get() == 1
        assert rejected.labels("invalid_field")._value.get() == 1

    asyncio.run(scenario())


def test_bodies_valid_after_conversion_stored(
    queue_url: str, engine: Engine, real_records: list[TelemetryRecord]
) -> None:
    # The lease decodes the plain bodies as records in one pass. The converted
    # ones fail that (a number sent as text, a time with an offset and nine
    # fraction digits) and are stored through pydantic instead, in the same batch.
    plain = real_records[:20]
    converted = []
    for index, record in enumerate(real_records[20:30]):
        body = record.to_body()
        body["gpu_index"] = str(body["gpu_index"])
        body["value"] = str(body["value"])
        body["timestamp"] = f"2026-03-01T12:00:00.{index:09d}+02:00"
        converted.append(body)

    async def scenario() -> None:
        await _publish(queue_url, plain + converted)
        async with _client(queue_url) as queue:
            collector = Collector(queue, engine, config=_config())

            async def drained() -> bool:
                return (await _stats(queue_url))["acked_total"] == 30

            await _run_until(collector, drained)
            stats = await _stats(queue_url)

        assert stats["dead_lettered_total"] == 0
        assert _sample_count(engine) == 30
        assert collector.metrics.messages_stored._value.get() == 30
        with engine.connect() as connection:
            samples = TelemetrySample.__table__.c  # type: ignore[attr-defined]
            stored = {
                row.idempotency_key: row
                for row in connection.execute(select(samples.idempotency_key, samples.timestamp, samples.value))
            }
        for body in converted:
            expected = TelemetryRecord.parse_body(body)
            row = stored[body["key"]]
            assert row.value == expected.value
            assert row.timestamp.replace(tzinfo=UTC) == expected.timestamp
        for record in plain:
            assert stored[record.key].timestamp.replace(tzinfo=UTC) == record.timestamp

    asyncio.run(scenario())


def test_offset_times_stored_in_utc(
    queue_url: str, engine: Engine, real_records: list[TelemetryRecord]
) -> None:
    # Bodies that the lease decodes as records, but with times at an offset
    # other than UTC: pydantic converts them, or rejects a time outside the datetime
    # range once in UTC, while the rest of the batch is stored.
    plain = real_records[:5]
    shifted = []
    for index, record in enumerate(real_records[5:9]):
        body = record.to_body()
        body["timestamp"] = f"2026-03-01T14:00:0{index}.000001+02:00"
        body["source_timestamp"] = "2025-07-18T09:12:34-11:30"
        shifted.append(body)
    out_of_range = {**real_records[9].to_body(), "timestamp": "0001-01-01T00:00:00+01:00"}

    async def scenario() -> None:
        await _publish(queue_url, [*plain, *shifted, out_of_range])
        async with _client(queue_url) as queue:
            collector = Collector(queue, engine, config=_config())

            await _run_until(collector, _settled(queue_url, acked=9, dead_lettered=1))

        assert _sample_count(engine) == 9
        assert collector.metrics.messages_rejected.labels("invalid_field")._value.get() == 1
        with engine.connect() as connection:
            samples = TelemetrySample.__table__.c  # type: ignore[attr-defined]
            stored = {
                row.idempotency_key: row
                for row in connection.execute(
                    select(samples.idempotency_key, samples.timestamp, samples.source_timestamp)
                )
            }
        for index, body in enumerate(shifted):
            row = stored[body["key"]]
            assert row.timestamp.replace(tzinfo=UTC) == datetime(2026, 3, 1, 12, 0, index, 1, tzinfo=UTC)
            assert row.source_timestamp.replace(tzinfo=UTC) == datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)
        assert out_of_range["key"] not in stored

    asyncio.run(scenario())


def test_unstorable_bodies_dead_lettered_alone(
    queue_url: str, engine: Engine, real_records: list[TelemetryRecord]
) -> None:
    # A value too large for a double is valid JSON that the queue server stores
    # as sent, and labels that are not all strings decode as raw JSON. Each of
    # them is rejected with its reason, and the rest of the lease is stored.
    plain = real_records[:5]
    huge = orjson.dumps({**real_records[5].to_body(), "value": 0}).replace(b'"value":0', b'"value":1e400')
    bad_labels = {**real_records[6].to_body(), "labels": {"gpu": 0}}

    async def scenario() -> None:
        await _publish(queue_url, [*plain, bad_labels])
        async with httpx.AsyncClient(base_url=queue_url) as http:
            published = await http.post(
                f"/v1/queues/{TELEMETRY_QUEUE}/messages",
                content=b'{"messages":[{"body":%s}]}' % huge,
                headers={"content-type": "application/json"},
            )
        assert published.status_code == 200
        async with _client(queue_url) as queue:
            collector = Collector(queue, engine, config=_config())

            await _run_until(collector, _settled(queue_url, acked=5, dead_lettered=2))

        assert _sample_count(engine) == 5
        assert collector.metrics.messages_rejected.labels("invalid_field")._value.get() == 2

    asyncio.run(scenario())


def test_redelivery_after_lease_expiry_stored_once(
    queue_url: str, engine: Engine, real_records: list[TelemetryRecord]
) -> None:
    records = real_records[:500]

    async def scenario() -> None:
        await _publish(queue_url, records)
        async with _client(queue_url) as queue:
            # A consumer that stores half of what it leased and then dies before
            # its ack. The leases expire and every message comes back.
            leased = await queue.lease(
                TELEMETRY_QUEUE, max_messages=500, wait_s=1, visibility_timeout_s=1
            )
            assert len(leased) == 500
            half = [TelemetryRecord.parse_body(message.body) for message in leased[:250]]
            await asyncio.to_thread(store_records, engine, half)
            await asyncio.sleep(1.5)

            collector = Collector(queue, engine, config=_config())

            async def drained() -> bool:
                return (await _stats(queue_url))["acked_total"] == 500

            await _run_until(collector, drained)
            stats = await _stats(queue_url)

        assert stats["redelivered_total"] >= 500
        assert _sample_count(engine) == 500
        assert _distinct_keys(engine) == 500
        assert collector.metrics.duplicates_ignored._value.get() == 250
        assert collector.metrics.messages_stored._value.get() == 250

    asyncio.run(scenario())


def test_sqlite_lock_outage_loses_nothing(
    queue_url: str, sqlite_url: str, alembic_config: Any, real_records: list[TelemetryRecord]
) -> None:
    from alembic import command

    command.upgrade(alembic_config(sqlite_url), "head")
    engine = make_engine(sqlite_url, sqlite_busy_timeout_ms=100)
    database_path = sqlite_url.removeprefix("sqlite:///")
    release_lock = threading.Event()
    lock_held = threading.Event()

    def hold_exclusive_lock() -> None:
        # Another writer holds an exclusive transaction, so every write of the
        # collector fails with "database is locked" until the lock is released.
        connection = sqlite3.connect(database_path, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        lock_held.set()
        release_lock.wait(60)
        connection.execute("ROLLBACK")
        connection.close()

    async def scenario() -> None:
        await _publish(queue_url, real_records[:1000])
        async with _client(queue_url) as queue:
            # The visibility timeout is shorter than the outage, so the leases
            # survive only because the collector extends them.
            collector = Collector(
                queue, engine, config=_config(batch_size=500, visibility_timeout_s=3)
            )
            task = asyncio.create_task(collector.run())
            try:
                async with asyncio.timeout(60):
                    while _sample_count(engine) < 1000:
                        await asyncio.sleep(0.05)

                    locker = threading.Thread(target=hold_exclusive_lock)
                    locker.start()
                    lock_held.wait(10)
                    await _publish(queue_url, real_records[1000:])
                    while collector.metrics.database_errors._value.get() < 3:
                        await asyncio.sleep(0.05)
                    acked_during_outage = (await _stats(queue_url))["acked_total"]
                    await asyncio.sleep(4)
                    stats_during_outage = await _stats(queue_url)
                    ready = await _ready(collector)

                    release_lock.set()
                    locker.join()
                    while (await _stats(queue_url))["acked_total"] < len(real_records):
                        await asyncio.sleep(0.05)
            finally:
                release_lock.set()
                collector.request_stop()
                await asyncio.wait_for(task, 30)

        assert acked_during_outage == 1000
        assert stats_during_outage["acked_total"] == 1000
        assert stats_during_outage["redelivered_total"] == 0
        assert stats_during_outage["leased"] > 0
        assert ready is False
        assert _sample_count(engine) == len(real_records)
        assert _distinct_keys(engine) == len(real_records)

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()


async def _ready(collector: Collector) -> bool:
    return await collector.check_database() and not collector.database_failing


@pytest.mark.postgres
def test_postgres_outage_loses_nothing(
    queue_url: str,
    temporary_postgres: Any,
    alembic_config: Any,
    real_records: list[TelemetryRecord],
) -> None:
    from alembic import command

    command.upgrade(alembic_config(temporary_postgres.url), "head")
    engine = make_engine(temporary_postgres.url)

    async def scenario() -> None:
        await _publish(queue_url, real_records[:1000])
        async with _client(queue_url) as queue:
            collector = Collector(
                queue, engine, config=_config(batch_size=500, visibility_timeout_s=3)
            )
            task = asyncio.create_task(collector.run())
            try:
                async with asyncio.timeout(90):
                    while _sample_count(engine) < 1000:
                        await asyncio.sleep(0.05)

                    # The server goes away. Open connections break and new ones are refused.
                    await asyncio.to_thread(temporary_postgres.stop)
                    await _publish(queue_url, real_records[1000:])
                    while collector.metrics.database_errors._value.get() < 3:
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(4)
                    stats_during_outage = await _stats(queue_url)
                    ready = await _ready(collector)

                    await asyncio.to_thread(temporary_postgres.start)
                    while (await _stats(queue_url))["acked_total"] < len(real_records):
                        await asyncio.sleep(0.05)
            finally:
                collector.request_stop()
                await asyncio.wait_for(task, 30)

        assert stats_during_outage["acked_total"] == 1000
        assert stats_during_outage["redelivered_total"] == 0
        assert stats_during_outage["leased"] > 0
        assert ready is False
        assert _sample_count(engine) == len(real_records)
        assert _distinct_keys(engine) == len(real_records)

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_record_rejected_by_postgres_dead_lettered(
    queue_url: str, postgres_url: str, alembic_config: Any, real_records: list[TelemetryRecord]
) -> None:
    # PostgreSQL text cannot contain NUL characters. The message is valid JSON and
    # a valid record, so only the database rejects it.
    from alembic import command

    command.upgrade(alembic_config(postgres_url), "head")
    engine = make_engine(postgres_url)
    refused = real_records[0].model_copy(update={"metric_name": "GPU_UTIL\x00", "key": "nul"})
    bodies = [*real_records[1:400], refused, *real_records[400:800]]

    async def scenario() -> None:
        await _publish(queue_url, bodies)
        async with _client(queue_url) as queue:
            collector = Collector(queue, engine, config=_config())

            await _run_until(collector, _settled(queue_url, acked=799, dead_lettered=1))
            dead = await queue.lease(DEAD_LETTER_QUEUE, max_messages=10, wait_s=0)

        assert _sample_count(engine) == 799
        assert [message.body["key"] for message in dead] == ["nul"]
        rejected = collector.metrics.messages_rejected
        assert rejected.labels("rejected_by_database")._value.get() == 1

    try:
        asyncio.run(scenario())
    finally:
        engine.dispose()
