"""GET /api/v1/gpus and /api/v1/gpus/{id} against real SQLite and PostgreSQL databases."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from api_test_data import GPU_UUID, METRICS, OTHER_GPU_UUID, at, make_record
from flask.testing import FlaskClient

from telemetry.record import TelemetryRecord

Store = Callable[[Sequence[TelemetryRecord]], None]


def test_gpu_list_empty(client: FlaskClient) -> None:
    response = client.get("/api/v1/gpus")

    assert response.status_code == 200
    assert response.get_json() == {"items": [], "count": 0}


def test_gpu_list_fields_and_order(client: FlaskClient, store: Store) -> None:
    store(
        [
            make_record(uuid=OTHER_GPU_UUID, hostname="host-b", gpu_index=0, timestamp=at(5)),
            make_record(timestamp=at(1), metric_name=METRICS[1]),
            make_record(timestamp=at(9), metric_name=METRICS[0]),
            make_record(uuid="GPU-third", hostname="host-a", gpu_index=3, timestamp=at(2)),
        ]
    )

    body = client.get("/api/v1/gpus").get_json()

    assert body["count"] == 3
    assert [item["id"] for item in body["items"]] == ["GPU-third", OTHER_GPU_UUID, GPU_UUID]
    gpu = body["items"][2]
    assert gpu == {
        "id": GPU_UUID,
        "hostname": "mtv5-dgx1-hgpu-031",
        "gpu_index": 0,
        "device": "nvidia0",
        "model_name": "NVIDIA H100 80GB HBM3",
        "first_seen": "2025-07-18T20:00:01.000000Z",
        "last_seen": "2025-07-18T20:00:09.000000Z",
        "metric_names": sorted([METRICS[0], METRICS[1]]),
    }


def test_gpu_list_hostname_filter(client: FlaskClient, store: Store) -> None:
    store(
        [
            make_record(uuid="GPU-a0", hostname="host-a", gpu_index=0, metric_name=METRICS[0]),
            make_record(uuid="GPU-a1", hostname="host-a", gpu_index=1, metric_name=METRICS[1]),
            make_record(uuid="GPU-b0", hostname="host-b", gpu_index=0, metric_name=METRICS[2]),
        ]
    )

    body = client.get("/api/v1/gpus", query_string={"hostname": "host-a"}).get_json()
    missing = client.get("/api/v1/gpus", query_string={"hostname": "host-z"}).get_json()

    assert [item["id"] for item in body["items"]] == ["GPU-a0", "GPU-a1"]
    assert [item["metric_names"] for item in body["items"]] == [[METRICS[0]], [METRICS[1]]]
    assert body["count"] == 2
    assert missing == {"items": [], "count": 0}


def test_gpu_get_one(client: FlaskClient, store: Store) -> None:
    store(
        [make_record(metric_name=name, timestamp=at(index)) for index, name in enumerate(METRICS)]
    )

    response = client.get(f"/api/v1/gpus/{GPU_UUID}")

    assert response.status_code == 200
    body = response.get_json()
    assert body["id"] == GPU_UUID
    assert body["metric_names"] == sorted(METRICS)
    assert body["first_seen"] == "2025-07-18T20:00:00.000000Z"
    assert body["last_seen"] == "2025-07-18T20:00:02.000000Z"


def test_gpu_get_unknown_404(client: FlaskClient, store: Store) -> None:
    store([make_record()])

    response = client.get("/api/v1/gpus/GPU-not-stored")

    assert response.status_code == 404
    assert response.content_type == "application/problem+json"
    assert "'GPU-not-stored'" in response.get_json()["detail"]
