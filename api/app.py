"""The application factory of the read-only REST API."""

from __future__ import annotations

import logging
from typing import Any

from apiflask import APIFlask
from sqlalchemy.engine import Engine

from api.database import ENGINE_EXTENSION
from api.gpus import gpus_blueprint
from api.health import DOCS_ASSETS_PATH, METRICS_EXTENSION, health_blueprint
from api.metrics import RequestMetrics
from api.problems import register_error_handlers
from api.schemas import ProblemSchema
from api.spec import customize_spec
from api.telemetry import telemetry_blueprint
from telemetry.database import make_engine

__all__ = ["API_VERSION", "create_app", "create_engine_for_api"]

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"

#: Seconds to wait for a PostgreSQL connection before the request fails with 503.
POSTGRES_CONNECT_TIMEOUT_S = 5
#: Seconds a request waits for a free pooled connection before it fails with 503.
POOL_TIMEOUT_S = 10


def create_engine_for_api(database_url: str, *, pool_size: int = 4) -> Engine:
    """Create the engine the API reads through.

    On PostgreSQL the pool keeps ``pool_size`` connections and a connection
    attempt gives up after a few seconds, so an unreachable server turns into
    a prompt 503 instead of a hung request.
    """
    kwargs: dict[str, Any] = {}
    if database_url.startswith(("postgresql", "postgres:")):
        kwargs = {
            "pool_size": pool_size,
            "max_overflow": 0,
            "pool_timeout": POOL_TIMEOUT_S,
            "connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S},
        }
    return make_engine(database_url, create_parent_dir=False, **kwargs)


def create_app(
    database_url: str | None = None,
    *,
    engine: Engine | None = None,
    token: str = "",
    pool_size: int = 4,
) -> APIFlask:
    """Create the API application.

    Pass either ``database_url`` or an existing ``engine``. A non-empty ``token``
    requires ``Authorization: Bearer <token>`` on every ``/api/v1`` route. The
    database is not contacted here, so the application starts while the
    database is down and returns 503 until it is reachable.
    """
    if engine is None:
        if database_url is None:
            raise TypeError("create_app() needs a database_url or an engine")
        engine = create_engine_for_api(database_url, pool_size=pool_size)

    app = APIFlask(
        __name__,
        title="GPU telemetry API",
        version=API_VERSION,
        docs_path="/docs",
        spec_path="/openapi.json",
    )
    app.config.update(
        API_TOKEN=token,
        VALIDATION_ERROR_STATUS_CODE=400,
        VALIDATION_ERROR_DESCRIPTION="Invalid or unknown query parameter.",
        VALIDATION_ERROR_SCHEMA=ProblemSchema,
        HTTP_ERROR_SCHEMA=ProblemSchema,
        AUTO_SERVERS=False,
        SWAGGER_UI_CSS=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
        SWAGGER_UI_BUNDLE_JS=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
        SWAGGER_UI_STANDALONE_PRESET_JS=f"{DOCS_ASSETS_PATH}/swagger-ui-standalone-preset.js",
        DOCS_FAVICON=f"{DOCS_ASSETS_PATH}/favicon-32x32.png",
        DESCRIPTION=(
            "Read-only access to GPU telemetry collected by the pipeline. "
            "Errors are RFC 9457 problem details. Routes under /api/v1 need "
            "'Authorization: Bearer <token>' when the server runs with API_TOKEN set."
        ),
    )
    app.extensions[ENGINE_EXTENSION] = engine
    request_metrics = RequestMetrics()
    request_metrics.install(app)
    app.extensions[METRICS_EXTENSION] = request_metrics

    register_error_handlers(app)
    app.register_blueprint(gpus_blueprint)
    app.register_blueprint(telemetry_blueprint)
    app.register_blueprint(health_blueprint)
    app.spec_processor(customize_spec)
    return app
