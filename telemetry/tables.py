"""SQLModel tables of the telemetry database.

Alembic migrations in ``migrations/`` create exactly this schema; a test compares
the two. Timestamps are stored in UTC: ``timestamptz`` on PostgreSQL, and on SQLite
as naive UTC text, which sorts in time order.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

__all__ = ["UtcDateTime", "Gpu", "GpuMetric", "TelemetrySample", "metadata"]


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime column that always stores and returns UTC.

    Naive datetimes are rejected on the way in, so local time never sneaks in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()!r}: pass an aware UTC datetime")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


#: Fill factor of the ``gpus`` table on PostgreSQL, in percent (see ``Gpu``).
GPUS_FILLFACTOR = 50

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid (and so auto-increment).
_SampleId = BigInteger().with_variant(Integer(), "sqlite")


class Gpu(SQLModel, table=True):
    """A GPU seen in telemetry, keyed by its uuid (gpu indexes repeat on every host)."""

    __tablename__ = "gpus"
    # A collector updates each GPU's last_seen in nearly every transaction. With
    # pages half empty, PostgreSQL can keep the new row version on the same page
    # (a HOT update) instead of adding entries to the indexes that the samples'
    # foreign key checks read. The collector's storage function wrote 81,000 to
    # 82,000 rows/s in transactions of 5000 rows against 72,000 to 73,000 at the
    # default fill factor of 100 (ad-hoc timing). SQLite ignores the option.
    __table_args__ = {"postgresql_with": {"fillfactor": GPUS_FILLFACTOR}}

    uuid: str = Field(sa_column=Column(String(128), primary_key=True))
    hostname: str = Field(sa_column=Column(String(255), nullable=False, index=True))
    gpu_index: int = Field(sa_column=Column(Integer, nullable=False))
    device: str = Field(sa_column=Column(String(64), nullable=False))
    model_name: str = Field(sa_column=Column(String(255), nullable=False))
    first_seen: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    last_seen: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))


class GpuMetric(SQLModel, table=True):
    """A metric name seen for a GPU, so listing GPUs never scans the samples."""

    __tablename__ = "gpu_metrics"

    gpu_uuid: str = Field(
        sa_column=Column(
            String(128), ForeignKey("gpus.uuid", ondelete="CASCADE"), primary_key=True
        )
    )
    metric_name: str = Field(sa_column=Column(String(128), primary_key=True))


class TelemetrySample(SQLModel, table=True):
    """One metric value of one GPU at the time the streamer processed it."""

    __tablename__ = "telemetry_samples"
    __table_args__ = (
        # Serves "one GPU's samples in a time window, ordered by time, then id".
        Index("ix_telemetry_samples_gpu_time", "gpu_uuid", "timestamp", "id"),
        # Collectors insert with ON CONFLICT DO NOTHING on this key, so a redelivered
        # message is stored once.
        UniqueConstraint("idempotency_key", name="uq_telemetry_samples_idempotency_key"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(_SampleId, primary_key=True, autoincrement=True)
    )
    gpu_uuid: str = Field(
        sa_column=Column(String(128), ForeignKey("gpus.uuid", ondelete="CASCADE"), nullable=False)
    )
    metric_name: str = Field(sa_column=Column(String(128), nullable=False))
    value: float
    timestamp: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    source_timestamp: datetime | None = Field(
        default=None, sa_column=Column(UtcDateTime(), nullable=True)
    )
    labels: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    container: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    pod: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    namespace: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    idempotency_key: str = Field(sa_column=Column(String(255), nullable=False))


metadata = SQLModel.metadata
