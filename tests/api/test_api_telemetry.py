"""GET /api/v1/gpus/{id}/telemetry against real SQLite and PostgreSQL databases."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import pytest
from api_test_data import GPU_UUID, METRICS, OTHER_GPU_UUID, at, make_record
from flask.testing import FlaskClient

from telemetry.record import TelemetryRecord

Store = Callable[[Sequence[TelemetryRecord]], None]
URL = f"/api/v1/gpus/{GPU_UUID}/telemetry"


def parse_time(text: str) -> datetime:
    # The fraction of a second is left out when zero, so strings do not sort by time.
    return datetime.fromisoformat(text)


def get_page(client: FlaskClient, **params: Any) -> dict[str, Any]:
    response = client.get(URL, query_string=params)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type == "application/json"
    return response.get_json()  # type: ignore[no-any-return]


def follow_cursors(client: FlaskClient, **params: Any) -> list[dict[str, Any]]:
    """Return every item of a query by following next_cursor to the end."""
    items: list[dict[str, Any]] = []
    page = get_page(client, **params)
    items.extend(page["items"])
    for _ in range(10_000):
        if page["next_cursor"] is None:
            return items
        page = get_page(client, **params, cursor=page["next_cursor"])
        items.extend(page["items"])
    raise AssertionError("paging did not end after 10,000 pages")


def test_telemetry_ordered_by_time_then_id(client: FlaskClient, store: Store) -> None:
    # Stored out of time order, with two samples sharing one timestamp.
    store(
        [
            make_record(timestamp=at(3), value=3.0),
            make_record(timestamp=at(1), value=1.0, metric_name=METRICS[1]),
            make_record(timestamp=at(1), value=1.5, metric_name=METRICS[2]),
            make_record(timestamp=at(2), value=2.0),
        ]
    )

    items = get_page(client)["items"]

    keys = [(parse_time(item["timestamp"]), item["id"]) for item in items]
    assert keys == sorted(keys)
    assert [item["timestamp"] for item in items] == [
        "2025-07-18T20:00:01.000000Z",
        "2025-07-18T20:00:01.000000Z",
        "2025-07-18T20:00:02.000000Z",
        "2025-07-18T20:00:03.000000Z",
    ]


def test_telemetry_item_fields(client: FlaskClient, store: Store) -> None:
    store(
        [
            make_record(
                timestamp=at(0.123456),
                source_timestamp=at(-5),
                value=66.781,
                labels={"job": "dcgm-exporter", "modelName": "NVIDIA H100 80GB HBM3"},
            )
        ]
    )

    page = get_page(client)

    assert page["next_cursor"] is None
    [item] = page["items"]
    assert set(item) == {"id", "timestamp", "metric_name", "value", "labels", "source_timestamp"}
    assert isinstance(item["id"], int)
    assert item["timestamp"] == "2025-07-18T20:00:00.123456Z"
    assert item["source_timestamp"] == "2025-07-18T19:59:55.000000Z"
    assert item["metric_name"] == METRICS[0]
    assert item["value"] == 66.781
    assert item["labels"] == {"job": "dcgm-exporter", "modelName": "NVIDIA H100 80GB HBM3"}


def test_telemetry_source_timestamp_null(client: FlaskClient, store: Store) -> None:
    store([make_record(source_timestamp=None)])

    [item] = get_page(client)["items"]

    assert item["source_timestamp"] is None


def test_telemetry_only_requested_gpu(client: FlaskClient, store: Store) -> None:
    store([make_record(value=1.0), make_record(uuid=OTHER_GPU_UUID, gpu_index=1, value=2.0)])

    items = get_page(client)["items"]

    assert [item["value"] for item in items] == [1.0]


def test_telemetry_both_bounds_inclusive(client: FlaskClient, store: Store) -> None:
    store([make_record(timestamp=at(seconds), value=seconds) for seconds in (9, 10, 15, 20, 21)])

    items = get_page(client, start_time="2025-07-18T20:00:10Z", end_time="2025-07-18T20:00:20Z")[
        "items"
    ]

    assert [item["value"] for item in items] == [10, 15, 20]


def test_telemetry_bounds_equal_select_one_instant(client: FlaskClient, store: Store) -> None:
    store([make_record(timestamp=at(seconds), value=seconds) for seconds in (9, 10, 11)])

    items = get_page(client, start_time="2025-07-18T20:00:10Z", end_time="2025-07-18T20:00:10Z")[
        "items"
    ]

    assert [item["value"] for item in items] == [10]


@pytest.mark.parametrize(
    ("start_time", "end_time"),
    [
        ("2025-07-18T22:00:10+02:00", "2025-07-18T22:00:20+02:00"),
        ("2025-07-18T14:30:10-05:30", "2025-07-18T14:30:20-05:30"),
        ("2025-07-18T20:00:10.000000Z", "2025-07-18T20:00:20.000000000Z"),
        ("2025-07-18t20:00:10z", "2025-07-18T20:00:20.0+00:00"),
    ],
    ids=["plus-offset", "minus-offset-half-hour", "fractional-seconds", "lowercase"],
)
def test_telemetry_time_string_forms(
    client: FlaskClient, store: Store, start_time: str, end_time: str
) -> None:
    store([make_record(timestamp=at(seconds), value=seconds) for seconds in (9, 10, 15, 20, 21)])

    items = get_page(client, start_time=start_time, end_time=end_time)["items"]

    assert [item["value"] for item in items] == [10, 15, 20]


def test_telemetry_sub_microsecond_bounds_stay_inside(client: FlaskClient, store: Store) -> None:
    store([make_record(timestamp=at(seconds), value=seconds) for seconds in (10, 20)])

    # 10.0000001 s lies after the sample at 10 s, and 19.9999999 s before the one at 20 s.
    items = get_page(
        client, start_time="2025-07-18T20:00:10.0000001Z", end_time="2025-07-18T20:00:19.9999999Z"
    )["items"]

    assert items == []


def test_telemetry_microsecond_bounds(client: FlaskClient, store: Store) -> None:
    store([make_record(timestamp=at(10 + micro / 1e6), value=micro) for micro in (0, 1, 2, 3)])

    items = get_page(
        client, start_time="2025-07-18T20:00:10.000001Z", end_time="2025-07-18T20:00:10.000002Z"
    )["items"]

    assert [item["value"] for item in items] == [1, 2]


def test_telemetry_metric_filter(client: FlaskClient, store: Store) -> None:
    store(
        [make_record(metric_name=name, timestamp=at(index)) for index, name in enumerate(METRICS)]
    )

    single = get_page(client, metric_name=METRICS[1])["items"]
    repeated = get_page(client, metric_name=[METRICS[0], METRICS[2]])["items"]
    not_stored = get_page(client, metric_name="DCGM_FI_DEV_NOT_STORED")["items"]

    assert [item["metric_name"] for item in single] == [METRICS[1]]
    assert [item["metric_name"] for item in repeated] == [METRICS[0], METRICS[2]]
    assert not_stored == []


def test_telemetry_empty_window_of_known_gpu(client: FlaskClient, store: Store) -> None:
    store([make_record(timestamp=at(0))])

    page = get_page(client, start_time="2030-01-01T00:00:00Z")

    assert page == {"items": [], "next_cursor": None}


def test_telemetry_default_limit_is_1000(client: FlaskClient, store: Store) -> None:
    store([make_record(timestamp=at(index)) for index in range(1001)])

    page = get_page(client)

    assert len(page["items"]) == 1000
    assert page["next_cursor"] is not None


def test_telemetry_last_full_page_has_no_cursor(client: FlaskClient, store: Store) -> None:
    store([make_record(timestamp=at(index)) for index in range(10)])

    page = get_page(client, limit=10)

    assert len(page["items"]) == 10
    assert page["next_cursor"] is None


def test_telemetry_paging_25000_samples_once_each(client: FlaskClient, store: Store) -> None:
    # 25,000 samples over 2,500 distinct timestamps, so many pages start and
    # end inside a group of samples that share one timestamp.
    records = [
        make_record(timestamp=at(index // 10 * 0.5), metric_name=METRICS[index % 3], value=index)
        for index in range(25_000)
    ]
    store(records)

    items = follow_cursors(client, limit=1000)

    values = [item["value"] for item in items]
    assert len(values) == 25_000
    assert sorted(values) == list(range(25_000))
    keys = [(parse_time(item["timestamp"]), item["id"]) for item in items]
    assert keys == sorted(keys)


def test_telemetry_paging_with_filters(client: FlaskClient, store: Store) -> None:
    store(
        [
            make_record(timestamp=at(index), metric_name=METRICS[index % 3], value=index)
            for index in range(300)
        ]
    )

    items = follow_cursors(
        client,
        limit=7,
        metric_name=[METRICS[0], METRICS[1]],
        start_time="2025-07-18T20:00:10Z",
        end_time="2025-07-18T20:04:00Z",
    )

    expected = [index for index in range(10, 241) if index % 3 != 2]
    assert [item["value"] for item in items] == expected


def test_telemetry_paging_sees_rows_inserted_later(client: FlaskClient, store: Store) -> None:
    store([make_record(timestamp=at(index), value=index) for index in range(100)])
    first = get_page(client, limit=30)

    # A collector stores newer samples while the client pages.
    store([make_record(timestamp=at(index), value=index) for index in range(100, 150)])
    items = list(first["items"])
    page = first
    while page["next_cursor"] is not None:
        page = get_page(client, limit=30, cursor=page["next_cursor"])
        items.extend(page["items"])

    assert [item["value"] for item in items] == list(range(150))


def test_telemetry_paging_skips_rows_behind_cursor(client: FlaskClient, store: Store) -> None:
    # The documented limit of keyset paging: a sample committed with a position
    # the client has already paged past is not returned by later pages.
    store([make_record(timestamp=at(index), value=index) for index in range(0, 100, 2)])
    first = get_page(client, limit=10)
    assert first["items"][-1]["value"] == 18

    store([make_record(timestamp=at(5), value=5), make_record(timestamp=at(51), value=51)])
    second = get_page(client, limit=100, cursor=first["next_cursor"])
    fresh = get_page(client, limit=100)

    assert 5 not in [item["value"] for item in second["items"]]
    assert 51 in [item["value"] for item in second["items"]]
    assert 5 in [item["value"] for item in fresh["items"]]


def test_telemetry_cursor_keeps_limit_free(client: FlaskClient, store: Store) -> None:
    store([make_record(timestamp=at(index), value=index) for index in range(20)])
    first = get_page(client, limit=5)

    second = get_page(client, limit=10, cursor=first["next_cursor"])

    assert [item["value"] for item in second["items"]] == list(range(5, 15))


def test_telemetry_unknown_gpu_404(client: FlaskClient, store: Store) -> None:
    store([make_record()])

    response = client.get("/api/v1/gpus/GPU-unknown/telemetry")

    assert response.status_code == 404
    assert response.content_type == "application/problem+json"
    assert "'GPU-unknown'" in response.get_json()["detail"]
