"""The committed OpenAPI document matches the code and is a valid OpenAPI 3.1 document."""

from __future__ import annotations

from pathlib import Path

import yaml
from openapi_spec_validator import validate

from api.spec import render_openapi

COMMITTED_SPEC = Path(__file__).resolve().parents[2] / "api" / "openapi.yaml"


def test_openapi_committed_file_up_to_date() -> None:
    generated = render_openapi()

    assert COMMITTED_SPEC.read_text(encoding="utf-8") == generated, (
        "api/openapi.yaml differs from the document the code generates: run `make openapi`"
    )


def test_openapi_document_valid() -> None:
    document = yaml.safe_load(COMMITTED_SPEC.read_text(encoding="utf-8"))

    validate(document)


def test_openapi_documents_every_error() -> None:
    document = yaml.safe_load(COMMITTED_SPEC.read_text(encoding="utf-8"))
    expected = {
        "/api/v1/gpus": {"200", "400", "401", "503"},
        "/api/v1/gpus/{id}": {"200", "400", "401", "404", "503"},
        "/api/v1/gpus/{id}/telemetry": {"200", "400", "401", "404", "503"},
    }

    for path, statuses in expected.items():
        responses = document["paths"][path]["get"]["responses"]
        assert set(responses) == statuses, path
        for status in statuses - {"200"}:
            assert list(responses[status]["content"]) == ["application/problem+json"], (
                path,
                status,
            )
        assert "Retry-After" in responses["503"]["headers"], path
        assert "example" in responses["200"]["content"]["application/json"], path


def test_openapi_served_matches_committed(sqlite_client) -> None:  # type: ignore[no-untyped-def]
    served = sqlite_client.get("/openapi.json").get_json()

    assert served == yaml.safe_load(COMMITTED_SPEC.read_text(encoding="utf-8"))
