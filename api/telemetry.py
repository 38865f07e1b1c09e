"""The ``/api/v1/gpus/{id}/telemetry`` resource: one GPU's samples, paged by cursor.

Paging is keyset pagination on ``(timestamp, id)``. Each page is one SELECT and
contains the matching samples that sort strictly after the previous page's
last sample. A chain of pages that follows ``next_cursor`` therefore has these
properties, whatever collectors insert meanwhile:

- No sample appears twice, because the keys of successive pages strictly increase.
- Every matching sample committed before the first page was read appears once.
- A sample committed during paging appears once if its key sorts after the
  last sample returned so far, and not at all if it sorts before. New samples
  normally sort last, because they carry the time the pipeline processed them.
  A sample sorts behind the chain's position only when it reaches the database
  late (a queue redelivery, a slow collector), or when a transaction commits
  after a concurrent one that received higher ids. A new query returns it.
- ``next_cursor`` is null once a page found no later matching sample. Samples
  committed after that are returned by a new query, for example one whose
  ``start_time`` is the last ``timestamp`` seen, skipping the ids already seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from apiflask import APIBlueprint, HTTPError
from flask import Response
from marshmallow import RAISE
from sqlalchemy.engine import Row

from api.auth import token_auth
from api.cursor import Cursor, InvalidCursor, query_fingerprint
from api.database import get_engine
from api.gpus import gpu_not_found
from api.queries import fetch_telemetry_page, gpu_exists, telemetry_page_statement
from api.schemas import API_ERROR_RESPONSES, TelemetryPageSchema, TelemetryQuery
from api.timestamps import format_rfc3339

__all__ = ["telemetry_blueprint"]

telemetry_blueprint = APIBlueprint(
    "telemetry", __name__, url_prefix="/api/v1/gpus", tag="Telemetry"
)

_PAGE_EXAMPLE = {
    "items": [
        {
            "id": 4711,
            "timestamp": "2025-07-18T20:42:34.123456Z",
            "metric_name": "DCGM_FI_DEV_GPU_UTIL",
            "value": 66.781,
            "labels": {"DCGM_FI_DRIVER_VERSION": "535.129.03", "job": "dcgm-exporter"},
            "source_timestamp": "2025-07-18T20:42:34Z",
        }
    ],
    "next_cursor": "eyJ2IjoxLCJ0IjoxNzUyODcxMzU0MTIzNDU2LCJpIjo0NzExLCJxIjoiMGEzZjVjOWQ0YjEyZTg3NyJ9",
}


@telemetry_blueprint.get("/<id>/telemetry")
@telemetry_blueprint.auth_required(token_auth)
@telemetry_blueprint.input(TelemetryQuery, location="query", arg_name="query", unknown=RAISE)
@telemetry_blueprint.output(TelemetryPageSchema, example=_PAGE_EXAMPLE)
@telemetry_blueprint.doc(
    summary="Get a GPU's telemetry",
    description=(
        "Samples ordered by processing time, then id. Follow next_cursor with the same "
        "other parameters to get every matching sample exactly once: a sample inserted "
        "while you page is returned when it sorts after your current position, and a "
        "sample committed behind that position is left to a new query."
    ),
    responses={**API_ERROR_RESPONSES, 404: "No telemetry is stored for a GPU with this id."},
)
def list_telemetry(id: str, query: dict[str, Any]) -> Response:
    """Return one page of the GPU's samples matching the query."""
    start_time: datetime | None = query.get("start_time")
    end_time: datetime | None = query.get("end_time")
    metric_names = sorted(set(query.get("metric_name") or ()))
    limit: int = query["limit"]

    fingerprint = query_fingerprint(id, start_time, end_time, metric_names)
    after = None
    if query.get("cursor") is not None:
        try:
            cursor = Cursor.decode(query["cursor"], fingerprint=fingerprint)
        except InvalidCursor as exc:
            raise HTTPError(400, detail=f"query parameter cursor is invalid: {exc}") from exc
        after = (cursor.timestamp, cursor.sample_id)

    statement = telemetry_page_statement(
        id,
        start_time=start_time,
        end_time=end_time,
        metric_names=metric_names,
        after=after,
        limit=limit + 1,
    )
    with get_engine().connect() as connection:
        rows = fetch_telemetry_page(connection, statement)
        if not rows and not gpu_exists(connection, id):
            raise gpu_not_found(id)

    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = Cursor(
            timestamp=last.timestamp, sample_id=last.id, fingerprint=fingerprint
        ).encode()
    return _page_response(rows, next_cursor)


#: Field names of a telemetry item, in the order of the statement's columns.
_ITEM_FIELDS = ("id", "timestamp", "metric_name", "value", "labels", "source_timestamp")


def _page_response(rows: Sequence[Row[Any]], next_cursor: str | None) -> Response:
    # Built by hand rather than through TelemetryPageSchema, because marshmallow
    # takes longer than the query itself for a page of 1000 samples. orjson
    # writes aware UTC datetimes as format_rfc3339 does, except that it drops a
    # zero fraction, so only those times are formatted here. They are common:
    # exporters stamp scrapes in whole seconds, and a scrape's samples share
    # their times, so each distinct time of the page is formatted once.
    whole_seconds: dict[datetime, str] = {}
    items = []
    for row in rows:
        item = dict(zip(_ITEM_FIELDS, row))
        for name in ("timestamp", "source_timestamp"):
            moment = item[name]
            if moment is not None and moment.microsecond == 0:
                text = whole_seconds.get(moment)
                if text is None:
                    text = whole_seconds[moment] = format_rfc3339(moment)
                item[name] = text
        items.append(item)
    body = orjson.dumps({"items": items, "next_cursor": next_cursor}, option=orjson.OPT_UTC_Z)
    return Response(body, content_type="application/json")
