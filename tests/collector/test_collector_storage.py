"""``store_records`` against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from collector.storage import StoreResult, store_records
from telemetry.database import make_engine
from telemetry.record import DecodedRecord, TelemetryRecord
from telemetry.tables import Gpu, GpuMetric, TelemetrySample, metadata

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _record(key: str, *, uuid: str = "GPU-a", seconds: float = 0, **fields: object) -> TelemetryRecord:
    values: dict[str, object] = {
        "uuid": uuid,
        "hostname": "host-1",
        "gpu_index": 0,
        "device": "nvidia0",
        "model_name": "NVIDIA H100 80GB HBM3",
        "metric_name": "DCGM_FI_DEV_GPU_UTIL",
        "value": 1.5,
        "labels": {"job": "dcgm"},
        "timestamp": START + timedelta(seconds=seconds),
        "key": key,
    }
    values.update(fields)
    return TelemetryRecord.model_validate(values)


def _count(engine: Engine, model: type) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(model)).scalar_one())


def _gpu(engine: Engine, uuid: str) -> Gpu:
    with engine.connect() as connection:
        row = connection.execute(select(Gpu.__table__).where(Gpu.__table__.c.uuid == uuid)).one()
    return Gpu.model_validate(row._mapping)


def test_store_real_csv_rows(engine: Engine, real_records: list[TelemetryRecord]) -> None:
    result = store_records(engine, real_records)

    assert result == StoreResult(stored=2470, duplicates=0)
    assert _count(engine, TelemetrySample) == 2470
    assert _count(engine, Gpu) == 247
    assert _count(engine, GpuMetric) == 2470


def test_store_twice_counts_duplicates(engine: Engine, real_records: list[TelemetryRecord]) -> None:
    store_records(engine, real_records[:1000])

    result = store_records(engine, real_records[500:1500])

    assert result == StoreResult(stored=500, duplicates=500)
    assert _count(engine, TelemetrySample) == 1500


def test_store_duplicate_key_within_batch(engine: Engine) -> None:
    records = [_record("same"), _record("same", value=9.0), _record("other")]

    result = store_records(engine, records)

    assert result == StoreResult(stored=2, duplicates=1)


def test_store_empty_batch(engine: Engine) -> None:
    assert store_records(engine, []) == StoreResult(stored=0, duplicates=0)
    assert _count(engine, Gpu) == 0


def test_store_round_trips_sample_fields(engine: Engine) -> None:
    record = _record(
        "k1",
        value=66.781,
        labels={"gpu": "0", "instance": "host-1:9400"},
        container="trainer",
        pod="trainer-0",
        namespace="ml",
        source_timestamp=datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC),
        timestamp=START + timedelta(microseconds=7),
    )

    store_records(engine, [record])

    with engine.connect() as connection:
        row = connection.execute(select(TelemetrySample.__table__)).one()
    sample = TelemetrySample.model_validate(row._mapping)
    assert sample.gpu_uuid == "GPU-a"
    assert sample.metric_name == "DCGM_FI_DEV_GPU_UTIL"
    assert sample.value == pytest.approx(66.781)
    assert sample.timestamp == START + timedelta(microseconds=7)
    assert sample.source_timestamp == datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)
    assert sample.labels == {"gpu": "0", "instance": "host-1:9400"}
    assert (sample.container, sample.pod, sample.namespace) == ("trainer", "trainer-0", "ml")
    assert sample.idempotency_key == "k1"


def test_store_widens_gpu_seen_range(engine: Engine) -> None:
    store_records(engine, [_record("k1", seconds=10), _record("k2", seconds=20)])

    store_records(
        engine,
        [
            _record("k3", seconds=5, hostname="old-name"),
            _record("k4", seconds=30, hostname="host-2", gpu_index=3),
        ],
    )

    gpu = _gpu(engine, "GPU-a")
    assert gpu.first_seen == START + timedelta(seconds=5)
    assert gpu.last_seen == START + timedelta(seconds=30)
    assert gpu.hostname == "host-2"
    assert gpu.gpu_index == 3


def test_store_older_batch_keeps_newest_gpu_fields(engine: Engine) -> None:
    store_records(engine, [_record("k1", seconds=60, hostname="new-host")])

    store_records(engine, [_record("k2", seconds=1, hostname="stale-host")])

    gpu = _gpu(engine, "GPU-a")
    assert gpu.hostname == "new-host"
    assert gpu.first_seen == START + timedelta(seconds=1)
    assert gpu.last_seen == START + timedelta(seconds=60)


def test_store_failure_rolls_back_batch(engine: Engine) -> None:
    store_records(engine, [_record("k1")])
    # Without gpu_metrics the second step fails after the GPU upsert has run,
    # so the new GPU must be rolled back with the rest of the batch.
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE gpu_metrics")

    with pytest.raises(DBAPIError):
        store_records(engine, [_record("k2", uuid="GPU-b")])

    assert _count(engine, TelemetrySample) == 1
    assert _count(engine, Gpu) == 1


def test_store_many_gpus_in_one_batch(engine: Engine) -> None:
    records = [_record(f"k{i}", uuid=f"GPU-{i:04d}", seconds=i) for i in range(1000)]

    result = store_records(engine, records)

    assert result == StoreResult(stored=1000, duplicates=0)
    assert _count(engine, Gpu) == 1000


def test_store_duplicates_keep_batch_gpus(engine: Engine) -> None:
    store_records(engine, [_record("k1")])

    # The stored key sends the batch past the plain insert to the conflict-ignoring one,
    # which must keep the batch's new GPU and its later samples.
    result = store_records(engine, [_record("k1"), _record("k2", uuid="GPU-b"), _record("k3", uuid="GPU-b")])

    assert result == StoreResult(stored=2, duplicates=1)
    assert _count(engine, TelemetrySample) == 3
    assert _count(engine, Gpu) == 2
    assert _count(engine, GpuMetric) == 2


def test_store_sqlite_within_parameter_limit(
    sqlite_url: str, real_records: list[TelemetryRecord]
) -> None:
    engine = make_engine(sqlite_url)

    @event.listens_for(engine, "connect")
    def lower_limit(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # 25 parameters: statements of 2 samples, 3 GPUs or 12 (GPU, metric) pairs.
        dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 25)

    try:
        metadata.create_all(engine)
        first = store_records(engine, real_records[:95])
        second = store_records(engine, real_records[90:101])
        samples = _count(engine, TelemetrySample)
        gpus = _count(engine, Gpu)
    finally:
        engine.dispose()

    assert first == StoreResult(stored=95, duplicates=0)
    assert second == StoreResult(stored=6, duplicates=5)
    assert samples == 101
    assert gpus == len({record.uuid for record in real_records[:101]})


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
        datetime(2026, 3, 1, 12, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 3, 1, 12, 0, 0, 120000, tzinfo=UTC),
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(2026, 3, 1, 13, 30, 0, 5, tzinfo=timezone(timedelta(hours=1, minutes=30))),
    ],
    ids=["whole-second", "one-microsecond", "trailing-zeros", "year-999", "offset"],
)
def test_store_timestamp_text_form(engine: Engine, moment: datetime) -> None:
    """Both timestamps read back equal, and on SQLite their text is the one SQLAlchemy writes.

    The API's time-window queries compare that text, so another form would sort wrongly.
    """
    record = DecodedRecord(
        uuid="GPU-a", hostname="host-1", gpu_index=0, device="nvidia0",
        model_name="NVIDIA H100 80GB HBM3", metric_name="DCGM_FI_DEV_GPU_UTIL", value=1.0,
        timestamp=moment, source_timestamp=moment, key="k1",
    )

    store_records(engine, [record])

    with engine.connect() as connection:
        row = connection.execute(select(TelemetrySample.__table__)).one()
        texts = connection.exec_driver_sql(
            "SELECT timestamp, source_timestamp FROM telemetry_samples"
        ).one()
    sample = TelemetrySample.model_validate(row._mapping)
    assert sample.timestamp == moment
    assert sample.source_timestamp == moment
    if engine.dialect.name == "sqlite":
        expected = moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
        assert tuple(texts) == (expected, expected)
