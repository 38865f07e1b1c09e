"""Health and metrics endpoints, served inside the collector's own event loop.

``GET /healthz`` returns 200 while the process runs. ``GET /readyz`` returns 200
when the database responds within 2 seconds, has every telemetry table (so the
migrations ran) and the last write of a batch did not fail, else 503.
``GET /metrics`` returns the collector's Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Protocol

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from collector.metrics import CollectorMetrics
from telemetry.database import missing_tables

__all__ = ["HealthServer", "create_health_app", "probe_database"]

logger = logging.getLogger(__name__)

#: How long the readiness probe waits for the database, in seconds.
READINESS_TIMEOUT_S = 2.0


class DatabaseWriter(Protocol):
    """Interface of the object behind the health endpoints: ``Collector`` or ``PushReceiver``."""

    engine: Engine
    database_failing: bool
    metrics: CollectorMetrics


async def probe_database(engine: Engine, timeout_s: float = READINESS_TIMEOUT_S) -> list[str] | None:
    """Return the telemetry tables missing from the database, or ``None`` when it is unreachable."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(_missing_tables, engine), timeout_s)
    except (SQLAlchemyError, TimeoutError) as exc:
        logger.debug("database check failed: %s", exc)
        return None


def _missing_tables(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return missing_tables(connection)


def create_health_app(collector: DatabaseWriter) -> Starlette:
    """Build the Starlette app of the collector's health and metrics endpoints."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        missing = await probe_database(collector.engine)
        reachable = missing is not None
        ready = reachable and not missing and not collector.database_failing
        body = {
            "status": "ready" if ready else "not ready",
            "database_reachable": reachable,
            "missing_tables": missing or [],
            "database_writes_failing": collector.database_failing,
        }
        if missing:
            body["detail"] = (
                f"the database has no table {', '.join(missing)}: "
                "run the migrations (alembic -c migrations/alembic.ini upgrade head)"
            )
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return Response(
            generate_latest(collector.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the collector's entry point."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HealthServer:
    """Serves ``create_health_app`` on ``host:port``; port 0 picks a free port."""

    def __init__(self, collector: DatabaseWriter, *, host: str, port: int) -> None:
        self._socket = socket.create_server((host, port), reuse_port=False)
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            create_health_app(collector),
            log_config=None,
            access_log=False,
            lifespan="off",
        )
        self._server = _EmbeddedServer(config)

    async def serve(self) -> None:
        """Serve on the already bound socket until ``stop`` is called."""
        logger.info("health and metrics endpoints on http://%s:%d", self.host, self.port)
        await self._server.serve(sockets=[self._socket])

    def stop(self) -> None:
        self._server.should_exit = True
