"""``store_records`` with a ``KnownGpus`` cache, against real SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from collector.storage import KnownGpus, StoreResult, store_records
from telemetry.record import TelemetryRecord
from telemetry.tables import Gpu, GpuMetric, TelemetrySample

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _record(
    key: str, *, uuid: str = "GPU-a", seconds: float = 0, metric: str = "DCGM_FI_DEV_GPU_UTIL",
    hostname: str = "host-1",
) -> TelemetryRecord:
    return TelemetryRecord(
        uuid=uuid,
        hostname=hostname,
        gpu_index=0,
        device="nvidia0",
        model_name="NVIDIA H100 80GB HBM3",
        metric_name=metric,
        value=1.5,
        labels={"job": "dcgm"},
        timestamp=START + timedelta(seconds=seconds),
        key=key,
    )


def _count(engine: Engine, model: type) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(model)).scalar_one())


def _gpu(engine: Engine, uuid: str) -> Gpu:
    with engine.connect() as connection:
        row = connection.execute(select(Gpu.__table__).where(Gpu.__table__.c.uuid == uuid)).one()
    return Gpu.model_validate(row._mapping)


def test_cached_store_matches_uncached(
    engine: Engine, real_records: list[TelemetryRecord]
) -> None:
    known = KnownGpus()

    results = [
        store_records(engine, real_records[start : start + 500], known=known)
        for start in range(0, len(real_records), 500)
    ]

    assert sum(result.stored for result in results) == len(real_records)
    assert _count(engine, TelemetrySample) == len(real_records)
    assert _count(engine, Gpu) == 247
    assert _count(engine, GpuMetric) == 2470
    assert len(known) == 247


def test_cached_store_widens_range_across_collectors(engine: Engine) -> None:
    # Two collectors with their own caches write interleaved time ranges; the
    # stored range is the union, whichever cache is stale.
    first, second = KnownGpus(), KnownGpus()

    store_records(engine, [_record("k1", seconds=10), _record("k2", seconds=20)], known=first)
    store_records(engine, [_record("k3", seconds=40, hostname="host-2")], known=second)
    store_records(engine, [_record("k4", seconds=15), _record("k5", seconds=5)], known=first)
    store_records(engine, [_record("k6", seconds=30, hostname="stale")], known=second)
    store_records(engine, [_record("k7", seconds=50, hostname="host-3")], known=first)

    gpu = _gpu(engine, "GPU-a")
    assert gpu.first_seen == START + timedelta(seconds=5)
    assert gpu.last_seen == START + timedelta(seconds=50)
    assert gpu.hostname == "host-3"
    assert _count(engine, TelemetrySample) == 7


def test_cached_store_inside_known_range_keeps_row(engine: Engine) -> None:
    known = KnownGpus()
    store_records(engine, [_record("k1", seconds=0), _record("k2", seconds=60)], known=known)

    result = store_records(engine, [_record("k3", seconds=30, hostname="other")], known=known)

    assert result == StoreResult(stored=1, duplicates=0)
    gpu = _gpu(engine, "GPU-a")
    assert gpu.hostname == "host-1"
    assert gpu.first_seen == START
    assert gpu.last_seen == START + timedelta(seconds=60)


def test_cached_store_adds_new_metric_of_known_gpu(engine: Engine) -> None:
    known = KnownGpus()
    store_records(engine, [_record("k1")], known=known)

    store_records(engine, [_record("k2", seconds=1, metric="DCGM_FI_DEV_GPU_TEMP")], known=known)

    assert _count(engine, GpuMetric) == 2


def test_cached_store_recovers_after_rows_deleted(engine: Engine) -> None:
    # A cache that outlives its rows (deleted, or the database restored from an
    # older backup) must not leave samples without their GPU.
    known = KnownGpus()
    store_records(engine, [_record("k1", seconds=0), _record("k2", seconds=60)], known=known)
    with engine.begin() as connection:
        connection.execute(TelemetrySample.__table__.delete())
        connection.execute(GpuMetric.__table__.delete())
        connection.execute(Gpu.__table__.delete())

    result = store_records(engine, [_record("k3", seconds=30)], known=known)

    assert result == StoreResult(stored=1, duplicates=0)
    assert _count(engine, Gpu) == 1
    assert _count(engine, GpuMetric) == 1
    assert _gpu(engine, "GPU-a").first_seen == START + timedelta(seconds=30)


def test_new_cache_after_restart_stores_duplicates_once(
    engine: Engine, real_records: list[TelemetryRecord]
) -> None:
    store_records(engine, real_records[:1000], known=KnownGpus())

    # A restarted collector starts with an empty cache and gets redeliveries.
    result = store_records(engine, real_records[:1500], known=KnownGpus())

    assert result == StoreResult(stored=500, duplicates=1000)
    assert _count(engine, TelemetrySample) == 1500
