"""Marshmallow schemas of the API's query parameters and responses.

They drive input validation and the generated OpenAPI document. The telemetry
page is serialized by hand for speed (see ``api.telemetry``), and the schemas
here remain its documented contract, which the tests check responses against.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from apiflask import Schema
from apiflask.fields import DateTime, Dict, Float, Integer, List, Nested, String
from apiflask.validators import Length, Range
from marshmallow import ValidationError, pre_load, validates_schema

from api.timestamps import InvalidTimestamp, Rounding, format_rfc3339, parse_rfc3339

__all__ = [
    "API_ERROR_RESPONSES",
    "DEFAULT_PAGE_LIMIT",
    "MAX_METRIC_NAMES",
    "MAX_PAGE_LIMIT",
    "GpuDetailSchema",
    "GpuListQuery",
    "GpuListSchema",
    "GpuSchema",
    "NoQuery",
    "ProblemSchema",
    "TelemetryPageSchema",
    "TelemetryQuery",
    "TelemetrySampleSchema",
]

#: Samples per page when the client gives no ``limit``.
DEFAULT_PAGE_LIMIT = 1000
#: Largest accepted ``limit``.
MAX_PAGE_LIMIT = 10_000
#: Largest number of ``metric_name`` parameters in one request.
MAX_METRIC_NAMES = 100

#: Error responses that every ``/api/v1`` route can return, documented with ``ProblemSchema``.
API_ERROR_RESPONSES: dict[int, str] = {
    400: "Invalid or unknown query parameter.",
    401: "Missing or invalid bearer token; checked only when the server has a token set.",
    503: "The database is unreachable; retry after the number of seconds in Retry-After.",
}

_TIME_EXAMPLE = "2025-07-18T20:42:34.123456Z"


class Rfc3339DateTime(DateTime):
    """An RFC 3339 date-time, parsed to aware UTC and written by ``format_rfc3339``."""

    def __init__(self, *, rounding: Rounding = Rounding.DOWN, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounding = rounding

    def _serialize(
        self, value: datetime | None, attr: str | None, obj: Any, **kwargs: Any
    ) -> str | None:
        return None if value is None else format_rfc3339(value)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str):
            raise ValidationError("expected an RFC 3339 date-time string")
        try:
            return parse_rfc3339(value, self.rounding)
        except InvalidTimestamp as exc:
            raise ValidationError(str(exc)) from exc


class ProblemSchema(Schema):
    """An error in the form of RFC 9457 problem details."""

    type = String(
        required=True, metadata={"description": "Problem type URI.", "example": "about:blank"}
    )
    title = String(
        required=True, metadata={"description": "HTTP reason phrase.", "example": "Bad Request"}
    )
    status = Integer(required=True, metadata={"description": "HTTP status code.", "example": 400})
    detail = String(
        required=True,
        metadata={
            "description": "What is wrong, naming the rejected value, and what to do.",
            "example": "query parameter limit='0' is invalid: expected an integer from 1 to 10000",
        },
    )


class QuerySchema(Schema):
    """Query parameters, each of which may appear once unless it is a list field."""

    @pre_load
    def _reject_repeated(self, data: Any, **kwargs: Any) -> Any:
        # webargs passes a proxy of the request's multi-dict; it silently takes
        # the first value of a repeated scalar parameter, so reject repeats here.
        multidict = getattr(data, "data", None)
        if multidict is None or not hasattr(multidict, "getlist"):
            return data
        for name in multidict:
            field = self.fields.get(name)
            values = multidict.getlist(name)
            if field is not None and not isinstance(field, List) and len(values) > 1:
                raise ValidationError(f"given {len(values)} times: pass it once", field_name=name)
        return data


class NoQuery(QuerySchema):
    """No query parameters: any parameter given is rejected as unknown."""


class GpuListQuery(QuerySchema):
    """Filters of the GPU list."""

    hostname = String(
        validate=Length(min=1, max=255),
        metadata={
            "description": "Return only the GPUs of this host.",
            "example": "mtv5-dgx1-hgpu-031",
        },
    )


class GpuSchema(Schema):
    """A GPU for which telemetry is stored."""

    id = String(
        required=True,
        attribute="uuid",
        metadata={
            "description": "GPU uuid.",
            "example": "GPU-5fd4f087-86f3-7a43-b711-4771313afc50",
        },
    )
    hostname = String(required=True, metadata={"example": "mtv5-dgx1-hgpu-031"})
    gpu_index = Integer(
        required=True, metadata={"description": "Index of the GPU on its host.", "example": 0}
    )
    device = String(required=True, metadata={"example": "nvidia0"})
    model_name = String(required=True, metadata={"example": "NVIDIA H100 80GB HBM3"})
    first_seen = Rfc3339DateTime(
        required=True,
        metadata={
            "description": "Processing time of the GPU's earliest stored sample.",
            "example": _TIME_EXAMPLE,
        },
    )
    last_seen = Rfc3339DateTime(
        required=True,
        metadata={
            "description": "Processing time of the GPU's latest stored sample.",
            "example": _TIME_EXAMPLE,
        },
    )
    metric_names = List(
        String(),
        required=True,
        metadata={
            "description": "Metric names stored for the GPU, sorted.",
            "example": ["DCGM_FI_DEV_GPU_UTIL"],
        },
    )


class GpuDetailSchema(GpuSchema):
    """A GPU for which telemetry is stored, returned on its own.

    It has the fields of ``GpuSchema``; a separate class keeps APIFlask from
    registering ``GpuSchema`` twice in the OpenAPI document.
    """


class GpuListSchema(Schema):
    """The whole GPU list, ordered by hostname, GPU index and uuid."""

    items = List(Nested(GpuSchema), required=True)
    count = Integer(required=True, metadata={"description": "Number of items.", "example": 1})


class TelemetryQuery(QuerySchema):
    """Filters and paging of a GPU's telemetry."""

    start_time = Rfc3339DateTime(
        rounding=Rounding.UP,
        metadata={
            "description": "Earliest sample time, inclusive; RFC 3339 with Z or an offset.",
            "example": "2025-07-18T20:00:00Z",
        },
    )
    end_time = Rfc3339DateTime(
        rounding=Rounding.DOWN,
        metadata={
            "description": "Latest sample time, inclusive; RFC 3339 with Z or an offset.",
            "example": "2025-07-18T21:00:00+00:00",
        },
    )
    metric_name = List(
        String(validate=Length(min=1, max=128)),
        validate=Length(max=MAX_METRIC_NAMES),
        metadata={
            "description": "Return only these metrics; repeat the parameter for several.",
            "example": ["DCGM_FI_DEV_GPU_UTIL"],
        },
    )
    limit = Integer(
        load_default=DEFAULT_PAGE_LIMIT,
        error_messages={"invalid": f"expected an integer from 1 to {MAX_PAGE_LIMIT}"},
        validate=Range(min=1, max=MAX_PAGE_LIMIT, error="expected an integer from {min} to {max}"),
        metadata={"description": "Largest number of samples on the page.", "example": 1000},
    )
    cursor = String(
        validate=Length(min=1, max=512),
        metadata={
            "description": "The next_cursor of the previous page; keep the other parameters unchanged."
        },
    )

    @validates_schema
    def _check_time_order(self, data: dict[str, Any], **kwargs: Any) -> None:
        start_time, end_time = data.get("start_time"), data.get("end_time")
        if start_time is not None and end_time is not None and start_time > end_time:
            raise ValidationError(
                f"start_time {format_rfc3339(start_time)!r} is after end_time "
                f"{format_rfc3339(end_time)!r}: pass a start_time at or before end_time"
            )


class TelemetrySampleSchema(Schema):
    """One metric value of a GPU."""

    id = Integer(required=True, metadata={"description": "Sample id.", "example": 4711})
    timestamp = Rfc3339DateTime(
        required=True,
        metadata={
            "description": "Time the pipeline processed the sample.",
            "example": _TIME_EXAMPLE,
        },
    )
    metric_name = String(required=True, metadata={"example": "DCGM_FI_DEV_GPU_UTIL"})
    value = Float(required=True, metadata={"example": 66.781})
    labels = Dict(
        keys=String(),
        values=String(),
        required=True,
        metadata={
            "description": "Exporter labels of the sample.",
            "example": {"job": "dcgm-exporter"},
        },
    )
    source_timestamp = Rfc3339DateTime(
        required=True,
        allow_none=True,
        metadata={
            "description": "The exporter's own time of the sample, if known.",
            "example": "2025-07-18T20:42:34Z",
        },
    )


class TelemetryPageSchema(Schema):
    """One page of a GPU's samples, ordered by timestamp, then id."""

    items = List(Nested(TelemetrySampleSchema), required=True)
    next_cursor = String(
        required=True,
        allow_none=True,
        metadata={
            "description": "Pass as cursor to get the next page; null when no later sample matched "
            "at the time of the request."
        },
    )
