"""The telemetry record: one DCGM metric sample of one GPU, as it travels on the queue.

The streamer builds these from CSV rows and publishes ``TelemetryRecord.to_body()``
as the message body; the collector validates bodies with ``TelemetryRecord.parse_body``.

``DecodedRecord`` is the collector's fast path: msgspec decodes and checks a body
in one pass, several times faster than JSON decoding plus pydantic validation (an
ad-hoc timing of 1000 real messages took 1.5 ms against about 11 ms).
A decoded record keeps its labels as raw JSON, which ``LabelsCheck`` checks. A
decoded record whose times are in UTC (``in_utc``) and whose labels pass that
check is one that ``TelemetryRecord`` accepts, with equal field values. ``DecodedRecord`` rejects
some bodies that ``TelemetryRecord`` accepts after a type conversion (a number
sent as a string, for example), and keeps a time's offset other than UTC as it
came. Such bodies, and the invalid ones, take the ``TelemetryRecord`` path, which
converts times to UTC and reports why a body is invalid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timezone
from typing import Annotated, Any

import msgspec
import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

__all__ = [
    "TelemetryRecord",
    "DecodedRecord",
    "AnyRecord",
    "InvalidRecord",
    "LabelsCheck",
    "TELEMETRY_QUEUE",
    "format_timestamp",
    "labels_json",
]

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

    @field_validator("timestamp", "source_timestamp", mode="before")
    @classmethod
    def _parse_rfc3339(cls, value: Any) -> Any:
        # RFC 3339 text is parsed as DecodedRecord parses it, so both round a
        # fraction of more than six digits the same way (pydantic alone truncates).
        # Other forms that pydantic accepts are left to pydantic.
        if isinstance(value, str):
            try:
                return msgspec.convert(value, datetime)
            except msgspec.ValidationError:
                pass
        return value

    @field_validator("timestamp", "source_timestamp")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value.isoformat()!r} has no UTC offset")
        return _to_utc(value)

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


def _to_utc(moment: datetime) -> datetime:
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:
        # For example 0001-01-01T00:00:00+01:00, which is before datetime.min in UTC.
        raise ValueError(f"timestamp {moment.isoformat()!r} is out of range in UTC") from None


_Text64 = Annotated[str, msgspec.Meta(max_length=64)]
_Text255 = Annotated[str, msgspec.Meta(max_length=255)]
_Name128 = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Name255 = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
_AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class DecodedRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """A telemetry record decoded by msgspec: ``TelemetryRecord``'s fields and constraints.

    The collector decodes lease responses straight into these. The module
    docstring says how they relate to ``TelemetryRecord``. Timestamps are aware
    datetimes with the offset the body gave: see ``in_utc``. ``labels`` is the
    body's labels object as raw JSON, not yet checked: see ``LabelsCheck``.
    Decoding the labels into dicts took 1.2 ms per 1000 records against 0.8 ms
    (ad-hoc timing), and each dict is one more object for the garbage collector
    to track.
    """

    uuid: _Name128
    hostname: _Name255
    gpu_index: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
    device: _Text64
    model_name: _Text255
    metric_name: _Name128
    # JSON has no NaN or infinity, and msgspec rejects numbers that overflow a
    # float, so every decoded value is finite.
    value: float
    timestamp: _AwareDatetime
    key: _Name255
    labels: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    container: _Text255 | None = None
    pod: _Text255 | None = None
    namespace: _Text255 | None = None
    source_timestamp: _AwareDatetime | None = None

    @property
    def in_utc(self) -> bool:
        """Return whether both times are in UTC, as ``TelemetryRecord`` stores them.

        msgspec decodes ``Z`` and ``+00:00`` to ``datetime.UTC``. A record with
        another offset goes through ``TelemetryRecord``, which converts it, or
        rejects it when the time lies outside the datetime range once in UTC. The
        caller checks this property in place of a ``__post_init__`` that converts
        the times, because msgspec calls a ``__post_init__`` for every record
        (about 0.5 µs each, ad-hoc timing).
        """
        return self.timestamp.tzinfo is UTC and (
            self.source_timestamp is None or self.source_timestamp.tzinfo is UTC
        )

    def to_plain(self) -> dict[str, Any]:
        """Return the record as a decoded JSON body, labels included, for ``TelemetryRecord``."""
        plain: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(self))
        return plain


class LabelsCheck:
    """Validator of the raw labels of ``DecodedRecord``s that remembers the labels it found valid.

    Valid labels are a JSON object of strings, as ``TelemetryRecord`` takes them.
    A series' labels repeat in each of its samples, so most checks find the text
    among the remembered ones. At most ``limit`` texts are kept, and past that the
    remembered set is emptied and filled again. One instance is used by one thread at a time.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._valid: set[bytes] = set()

    def __call__(self, labels: msgspec.Raw) -> bool:
        """Return whether ``labels`` is a JSON object of strings."""
        text = bytes(labels)
        if text in self._valid:
            return True
        try:
            _LABELS_DECODER.decode(text)
        except msgspec.DecodeError:
            return False
        if len(self._valid) >= self._limit:
            self._valid.clear()
        self._valid.add(text)
        return True


_LABELS_DECODER = msgspec.json.Decoder(dict[str, str])


#: Either form of a valid record. Both have the same fields and value types but
#: ``labels``. The collector stores a ``DecodedRecord`` only when ``in_utc`` and
#: its labels pass ``LabelsCheck``, so its times are UTC too.
AnyRecord = TelemetryRecord | DecodedRecord


def labels_json(record: AnyRecord) -> str:
    """Return the record's labels as JSON text, as they are stored."""
    labels = record.labels
    if isinstance(labels, msgspec.Raw):
        return bytes(labels).decode()
    return orjson.dumps(labels).decode()


def format_timestamp(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with microseconds, e.g. ``2026-01-02T03:04:05.000006Z``.

    The year always has four digits. ``strftime("%Y")`` drops the leading zeros
    of years before 1000 on glibc, which RFC 3339 parsers reject.
    """
    utc = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        location = ".".join(str(item) for item in error["loc"]) or "body"
        parts.append(f"{location}: {error['msg']}")
    return "invalid telemetry record: " + "; ".join(parts)
