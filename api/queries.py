"""Read queries of the API, in SQLAlchemy Core, with no web framework involved.

The benchmark issues ``telemetry_page_statement`` directly as the ceiling the
HTTP API is compared against, so the API and the benchmark share one query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, bindparam, select, tuple_
from sqlalchemy.engine import Connection, Row
from sqlalchemy.types import BigInteger

from telemetry.tables import Gpu, GpuMetric, TelemetrySample, UtcDateTime

__all__ = [
    "GpuSummary",
    "fetch_gpu",
    "fetch_gpus",
    "fetch_telemetry_page",
    "gpu_exists",
    "telemetry_page_statement",
]

_gpus = Gpu.__table__  # type: ignore[attr-defined]
_gpu_metrics = GpuMetric.__table__  # type: ignore[attr-defined]
_samples = TelemetrySample.__table__  # type: ignore[attr-defined]


@dataclass
class GpuSummary:
    """A GPU with the time span of its samples and the metric names seen for it."""

    uuid: str
    hostname: str
    gpu_index: int
    device: str
    model_name: str
    first_seen: datetime
    last_seen: datetime
    metric_names: list[str] = field(default_factory=list)


def fetch_gpus(connection: Connection, *, hostname: str | None = None) -> list[GpuSummary]:
    """Return every GPU, optionally of one host, ordered by hostname, GPU index and uuid."""
    gpu_query = select(_gpus).order_by(_gpus.c.hostname, _gpus.c.gpu_index, _gpus.c.uuid)
    metric_query = select(_gpu_metrics.c.gpu_uuid, _gpu_metrics.c.metric_name).order_by(
        _gpu_metrics.c.gpu_uuid, _gpu_metrics.c.metric_name
    )
    if hostname is not None:
        gpu_query = gpu_query.where(_gpus.c.hostname == hostname)
        metric_query = metric_query.join(_gpus, _gpus.c.uuid == _gpu_metrics.c.gpu_uuid).where(
            _gpus.c.hostname == hostname
        )

    summaries = {row.uuid: _summary(row) for row in connection.execute(gpu_query)}
    for gpu_uuid, metric_name in connection.execute(metric_query):
        # A GPU inserted between the two statements has metrics but no summary yet.
        summary = summaries.get(gpu_uuid)
        if summary is not None:
            summary.metric_names.append(metric_name)
    return list(summaries.values())


def fetch_gpu(connection: Connection, gpu_uuid: str) -> GpuSummary | None:
    """Return one GPU, or None when no telemetry of it is stored."""
    row = connection.execute(select(_gpus).where(_gpus.c.uuid == gpu_uuid)).first()
    if row is None:
        return None
    summary = _summary(row)
    metric_query = (
        select(_gpu_metrics.c.metric_name)
        .where(_gpu_metrics.c.gpu_uuid == gpu_uuid)
        .order_by(_gpu_metrics.c.metric_name)
    )
    summary.metric_names = list(connection.scalars(metric_query))
    return summary


def gpu_exists(connection: Connection, gpu_uuid: str) -> bool:
    """Return whether telemetry of the GPU with ``gpu_uuid`` is stored."""
    statement = select(_gpus.c.uuid).where(_gpus.c.uuid == gpu_uuid)
    return connection.execute(statement).first() is not None


def telemetry_page_statement(
    gpu_uuid: str,
    *,
    start_time: datetime | None = None,
    end_time: datetime | None = None,
    metric_names: Sequence[str] = (),
    after: tuple[datetime, int] | None = None,
    limit: int,
) -> Select[Any]:
    """Build the query for one page of a GPU's samples, ordered by (timestamp, id).

    Both time bounds are inclusive. ``after`` is the (timestamp, id) of the last
    sample of the previous page; the page starts strictly after it. The query
    selects ``limit`` rows; callers ask for one more than they return to learn
    whether another page exists.
    """
    conditions = [_samples.c.gpu_uuid == gpu_uuid]
    if start_time is not None:
        conditions.append(
            _samples.c.timestamp >= bindparam("start_time", start_time, UtcDateTime())
        )
    if end_time is not None:
        conditions.append(_samples.c.timestamp <= bindparam("end_time", end_time, UtcDateTime()))
    if metric_names:
        conditions.append(_samples.c.metric_name.in_(list(metric_names)))
    if after is not None:
        # A row-value comparison lets SQLite and PostgreSQL seek in the
        # (gpu_uuid, timestamp, id) index instead of filtering row by row.
        after_timestamp, after_id = after
        conditions.append(
            tuple_(_samples.c.timestamp, _samples.c.id)
            > tuple_(
                bindparam("after_timestamp", after_timestamp, UtcDateTime()),
                bindparam("after_id", after_id, BigInteger()),
            )
        )

    return (
        select(
            _samples.c.id,
            _samples.c.timestamp,
            _samples.c.metric_name,
            _samples.c.value,
            _samples.c.labels,
            _samples.c.source_timestamp,
        )
        .where(and_(*conditions))
        .order_by(_samples.c.timestamp, _samples.c.id)
        .limit(limit)
    )


def fetch_telemetry_page(connection: Connection, statement: Select[Any]) -> Sequence[Row[Any]]:
    """Run a statement from ``telemetry_page_statement`` and return its rows."""
    return connection.execute(statement).all()


def _summary(row: Row[Any]) -> GpuSummary:
    return GpuSummary(
        uuid=row.uuid,
        hostname=row.hostname,
        gpu_index=row.gpu_index,
        device=row.device,
        model_name=row.model_name,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
    )
