"""The telemetry record: one DCGM metric sample of one GPU, as it travels on the queue.

The streamer builds these from CSV rows and publishes ``TelemetryRecord.to_body()``
as the message body; the collector validates bodies with ``TelemetryRecord.parse_body``.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from collections.abc import Sequence
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

__all__ = ["TelemetryRecord", "InvalidRecord", "TELEMETRY_QUEUE", "format_timestamp"]

#: Name of the queue that carries telemetry records.
TELEMETRY_QUEUE = "telemetry"


class InvalidRecord(ValueError):
    """A message body that is not a valid telemetry record.

    ``reason`` is a short, bounded label (``"invalid_json"``, ``"missing_field"``,
    ``"invalid_value"``, ...) fit for a metric label; the message has the details.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TelemetryRecord(BaseModel):
    """One metric sample of one GPU.

    ``timestamp`` is the time the streamer processed the row (UTC, microsecond
    precision); ``source_timestamp`` is the exporter's own time, kept as provenance.
    ``key`` is the idempotency key, unique per (source file, run, pass, line).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    uuid: str = Field(min_length=1, max_length=128)
    hostname: str = Field(min_length=1, max_length=255)
    gpu_index: int = Field(ge=0, le=1_000_000)
    device: str = Field(max_length=64)
    model_name: str = Field(max_length=255)
    metric_name: str = Field(min_length=1, max_length=128)
    value: float
    labels: dict[str, str] = Field(default_factory=dict)
    container: str | None = Field(default=None, max_length=255)
    pod: str | None = Field(default=None, max_length=255)
    namespace: str | None = Field(default=None, max_length=255)
    timestamp: datetime
    source_timestamp: datetime | None = None
    key: str = Field(min_length=1, max_length=255)

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"value must be a finite number, got {value!r}")
        return value

    @field_validator("timestamp", "source_timestamp")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value.isoformat()!r} has no UTC offset")
        return value.astimezone(timezone.utc)

    def to_body(self) -> dict[str, Any]:
        """Return the JSON-ready message body."""
        body = self.model_dump()
        body["timestamp"] = format_timestamp(self.timestamp)
        body["source_timestamp"] = (
            format_timestamp(self.source_timestamp) if self.source_timestamp else None
        )
        return body

    @classmethod
    def parse_body(cls, body: Any) -> "TelemetryRecord":
        """Validate a decoded message body (or raw JSON bytes).

        Raises ``InvalidRecord`` with a bounded ``reason`` label.
        """
        if isinstance(body, (bytes, bytearray, memoryview, str)):
            try:
                body = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise InvalidRecord("invalid_json", f"message body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRecord(
                "not_an_object", f"message body must be a JSON object, got {type(body).__name__}"
            )
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            reason = "missing_field" if first["type"] == "missing" else "invalid_field"
            raise InvalidRecord(reason, _describe(exc)) from exc

    @classmethod
    def parse_bodies(cls, bodies: Sequence[Any]) -> list["TelemetryRecord | InvalidRecord"]:
        """Validate many message bodies; return each one's record or ``InvalidRecord``.

        The result has one entry per body, in order, each as ``parse_body`` would
        return or raise it. A list of valid JSON objects is validated in one call,
        which costs less per body than one call each.
        """
        if all(isinstance(body, dict) for body in bodies):
            try:
                return list(_RECORD_LIST.validate_python(bodies))
            except ValidationError:
                pass  # At least one body is invalid: find which, one by one.

        results: list[TelemetryRecord | InvalidRecord] = []
        for body in bodies:
            try:
                results.append(cls.parse_body(body))
            except InvalidRecord as exc:
                results.append(exc)
        return results


_RECORD_LIST = TypeAdapter(list[TelemetryRecord])


def format_timestamp(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with microseconds, e.g. ``2026-01-02T03:04:05.000006Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        location = ".".join(str(item) for item in error["loc"]) or "body"
        parts.append(f"{location}: {error['msg']}")
    return "invalid telemetry record: " + "; ".join(parts)
