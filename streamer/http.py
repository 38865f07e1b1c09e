"""Health, readiness and metrics endpoints, served by uvicorn inside the streamer's event loop."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["make_app", "make_server", "bind_socket", "EmbeddedServer"]

logger = logging.getLogger(__name__)


def make_app(registry: CollectorRegistry, is_ready: Callable[[], bool]) -> Starlette:
    """Build the app: ``/healthz`` (200 while the process runs), ``/readyz`` (200 once
    the streamer works on the run, 503 before and while it stops) and ``/metrics``."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if is_ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the program that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket; port 0 picks a free one. Raises ``OSError`` when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def make_server(app: Starlette, *, host: str, port: int) -> EmbeddedServer:
    config = uvicorn.Config(
        app, host=host, port=port, lifespan="off", log_config=None, log_level="warning", access_log=False
    )
    return EmbeddedServer(config)
