"""Health, readiness, metrics and documentation endpoints."""

from __future__ import annotations

import re

from api_test_data import GPU_UUID
from flask.testing import FlaskClient


def test_healthz_ok(client: FlaskClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_ok_with_tables(client: FlaskClient) -> None:
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_metrics_count_by_route_template(client: FlaskClient) -> None:
    client.get("/api/v1/gpus")
    client.get(f"/api/v1/gpus/{GPU_UUID}")
    client.get("/api/v1/gpus/GPU-other")
    client.get("/no/such/route")

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    assert 'api_http_requests_total{method="GET",route="/api/v1/gpus",status="200"} 1.0' in text
    assert (
        'api_http_requests_total{method="GET",route="/api/v1/gpus/<id>",status="404"} 2.0' in text
    )
    assert 'api_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert (
        'api_http_request_duration_seconds_count{method="GET",route="/api/v1/gpus/<id>"} 2.0'
        in text
    )
    assert GPU_UUID not in text


def test_metrics_unusual_method_bounded(client: FlaskClient) -> None:
    client.open("/api/v1/gpus", method="BREW")

    text = client.get("/metrics").get_data(as_text=True)

    assert 'method="other"' in text
    assert "BREW" not in text


def test_docs_serves_swagger_ui(client: FlaskClient) -> None:
    response = client.get("/docs")

    assert response.status_code == 200
    assert "swagger" in response.get_data(as_text=True).lower()


def test_docs_loads_only_local_assets(client: FlaskClient) -> None:
    page = client.get("/docs").get_data(as_text=True)
    links = re.findall(r'(?:src|href)="([^"]+)"', page)

    assert links
    assert not [link for link in links if "://" in link]
    for link in links:
        with client.get(link) as asset:
            assert asset.status_code == 200, link
            assert len(asset.get_data()) > 0, link


def test_docs_asset_unknown_is_404(client: FlaskClient) -> None:
    assert client.get("/docs/assets/missing.js").status_code == 404
    assert client.get("/docs/assets/../__init__.py").status_code == 404
