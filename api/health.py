"""Liveness, readiness and Prometheus metrics endpoints and the Swagger UI files; they need no token."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint, Schema
from apiflask.fields import String
from flask import Response, current_app, send_from_directory
from swagger_ui_bundle import swagger_ui_path
from sqlalchemy.exc import SQLAlchemyError

from api.database import get_engine
from api.problems import RETRY_AFTER_S, log_database_error, problem_response
from telemetry.database import missing_tables

__all__ = ["DOCS_ASSETS_PATH", "METRICS_EXTENSION", "health_blueprint"]

#: URL prefix of the Swagger UI files that ``/docs`` loads, served from the
#: swagger-ui-bundle package so the page works without internet access.
DOCS_ASSETS_PATH = "/docs/assets"

#: Key of the ``RequestMetrics`` in ``app.extensions``.
METRICS_EXTENSION = "telemetry_request_metrics"

health_blueprint = APIBlueprint("health", __name__, tag="Operations")


class StatusSchema(Schema):
    """Status of a probe."""

    status = String(required=True, metadata={"example": "ok"})


@health_blueprint.get("/healthz")
@health_blueprint.output(StatusSchema, example={"status": "ok"})
@health_blueprint.doc(
    summary="Liveness probe", description="Returns 200 while the process serves requests."
)
def healthz() -> dict[str, Any]:
    """Return ok; the process is alive."""
    return {"status": "ok"}


@health_blueprint.get("/readyz")
@health_blueprint.output(StatusSchema, example={"status": "ok"})
@health_blueprint.doc(
    summary="Readiness probe",
    description="Returns 200 when the database is reachable and contains every telemetry table.",
    responses={503: "The database is unreachable or has no telemetry tables yet."},
)
def readyz() -> dict[str, Any] | Response:
    """Return ok when the database is reachable and has every telemetry table, else a 503 problem."""
    try:
        with get_engine().connect() as connection:
            missing = missing_tables(connection)
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        log_database_error("readiness check failed: %s", cause)
        return problem_response(
            503,
            f"the database is not ready ({type(cause).__name__}): retry after {RETRY_AFTER_S} seconds",
            {"Retry-After": str(RETRY_AFTER_S)},
        )
    if missing:
        log_database_error("readiness check failed: missing tables %s", ", ".join(missing))
        return problem_response(
            503,
            f"the database is not ready (missing tables {', '.join(missing)}): apply the "
            f"migrations, then retry after {RETRY_AFTER_S} seconds",
            {"Retry-After": str(RETRY_AFTER_S)},
        )
    return {"status": "ok"}


_METRICS_RESPONSES: dict[int | str, dict[str, str | dict[str, dict[str, Any]]]] = {
    200: {
        "description": "Metrics in the Prometheus text format.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


@health_blueprint.get("/metrics")
@health_blueprint.doc(summary="Prometheus metrics", responses=_METRICS_RESPONSES)
def metrics() -> Response:
    """Return the request metrics in the Prometheus text format."""
    return current_app.extensions[METRICS_EXTENSION].render()  # type: ignore[no-any-return]


@health_blueprint.get(f"{DOCS_ASSETS_PATH}/<path:filename>")
@health_blueprint.doc(hide=True)
def docs_asset(filename: str) -> Response:
    """Return one Swagger UI file; unknown names are a 404."""
    return send_from_directory(swagger_ui_path, filename, max_age=86400)
