"""Test data of the API tests: records stored through the collector's insert path."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine

from collector.storage import store_records
from telemetry.record import TelemetryRecord

#: Processing time of the first sample in the tests' data.
BASE_TIME = datetime(2025, 7, 18, 20, 0, 0, tzinfo=UTC)
GPU_UUID = "GPU-5fd4f087-86f3-7a43-b711-4771313afc50"
OTHER_GPU_UUID = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
METRICS = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE")
API_TOKEN = "test-token-7f3a"

_record_keys = itertools.count()


def make_record(
    *,
    uuid: str = GPU_UUID,
    hostname: str = "mtv5-dgx1-hgpu-031",
    gpu_index: int = 0,
    metric_name: str = METRICS[0],
    value: float = 1.0,
    timestamp: datetime = BASE_TIME,
    source_timestamp: datetime | None = None,
    labels: dict[str, str] | None = None,
) -> TelemetryRecord:
    """Build a record with a unique idempotency key."""
    return TelemetryRecord(
        uuid=uuid,
        hostname=hostname,
        gpu_index=gpu_index,
        device=f"nvidia{gpu_index}",
        model_name="NVIDIA H100 80GB HBM3",
        metric_name=metric_name,
        value=value,
        labels={"job": "dcgm-exporter"} if labels is None else labels,
        timestamp=timestamp,
        source_timestamp=source_timestamp,
        key=f"test:{next(_record_keys)}",
    )


def store_in_batches(
    engine: Engine, records: Sequence[TelemetryRecord], batch_size: int = 5000
) -> None:
    """Store records through the collector's insert path, one transaction per batch."""
    for start in range(0, len(records), batch_size):
        store_records(engine, records[start : start + batch_size])


def at(seconds: float) -> datetime:
    """Return BASE_TIME plus ``seconds``."""
    return BASE_TIME + timedelta(seconds=seconds)
