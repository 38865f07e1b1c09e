"""Entry point of ``telemetry-api``: serve the API with granian's WSGI server.

Flags override the ``API_*`` environment variables and ``DATABASE_URL``.
Granian runs the HTTP protocol in Rust threads and calls the Flask application
from ``--threads`` Python threads in each of ``--workers`` processes. SIGTERM
and SIGINT stop it cleanly with exit status 0.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from api.settings import ApiSettings
from telemetry.database import DEFAULT_DATABASE_URL
from telemetry.settings import SettingsError

__all__ = ["main"]

# Named explicitly: under `python -m api` the module name is "__main__".
logger = logging.getLogger("api.__main__")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Seconds granian waits for a worker to finish its requests after SIGTERM before killing it.
# NOTE: one of eight manual stops with two workers left a worker hanging after
# "Stopping worker"; the cause is not known, and this bound makes the stop finish.
WORKER_STOP_TIMEOUT_S = 10


def parse_args(argv: Sequence[str] | None, defaults: ApiSettings) -> ApiSettings:
    """Parse command-line flags over the settings read from the environment."""
    parser = argparse.ArgumentParser(
        prog="telemetry-api",
        description="Serve the read-only GPU telemetry REST API.",
    )
    parser.add_argument(
        "--host", default=defaults.host, help="bind address (API_HOST, default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="TCP port (API_PORT, default %(default)s)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="worker processes (API_WORKERS, default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="request threads and database connections per worker (API_THREADS, default %(default)s)",
    )
    parser.add_argument(
        "--database-url",
        default=defaults.database_url,
        help=f"SQLAlchemy URL of the telemetry database (DATABASE_URL, default {DEFAULT_DATABASE_URL})",
    )
    parser.add_argument(
        "--token",
        default=defaults.token,
        help="bearer token required on /api/v1 routes; empty means open (API_TOKEN, default empty; "
        "prefer the variable, because a flag is visible in the process list)",
    )
    parser.add_argument(
        "--log-level",
        default=defaults.log_level,
        help="log level (API_LOG_LEVEL, default %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        return ApiSettings(
            database_url=args.database_url,
            host=args.host,
            port=args.port,
            workers=args.workers,
            threads=args.threads,
            token=args.token,
            log_level=args.log_level.upper(),
        )
    except SettingsError as exc:
        parser.error(str(exc))
        raise  # parser.error exits; this line only satisfies type checkers


def load_wsgi_app(settings: ApiSettings, _target: object = None) -> Callable[..., Any]:
    """Create the application inside a worker process (granian calls this there)."""
    from api.app import create_app

    _configure_logging(settings.log_level)
    return create_app(settings.database_url, token=settings.token, pool_size=settings.threads)


def serve(settings: ApiSettings) -> None:
    """Run granian until SIGTERM or SIGINT."""
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Set before any worker imports prometheus_client, which reads it at import.
        metrics_dir = tempfile.mkdtemp(prefix="telemetry-api-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            _serve(settings)
        finally:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return
    _serve(settings)


def _serve(settings: ApiSettings) -> None:
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    server = Server(
        "api.app:create_app",  # shown in the process title; the loader below builds the app
        address=settings.host,
        port=settings.port,
        interface=Interfaces.WSGI,
        workers=settings.workers,
        blocking_threads=settings.threads,
        workers_kill_timeout=WORKER_STOP_TIMEOUT_S,
        # No backpressure argument: granian counts it per connection, so a value
        # as small as the thread count lets idle keep-alive clients block others.
        log_level=LogLevels(settings.log_level.lower()),
        log_dictconfig=_granian_log_config(settings.log_level),
    )
    server.serve(target_loader=functools.partial(load_wsgi_app, settings), wrap_loader=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``telemetry-api`` command."""
    try:
        defaults = ApiSettings.from_env()
    except SettingsError as exc:
        print(f"telemetry-api: {exc}", file=sys.stderr)
        return 2
    settings = parse_args(argv, defaults)
    _configure_logging(settings.log_level)
    if not settings.token:
        logger.warning("API_TOKEN is not set: the read API accepts requests without a token")
    logger.info(
        "serving the API on http://%s:%d with %d worker(s) of %d thread(s)",
        settings.host,
        settings.port,
        settings.workers,
        settings.threads,
    )
    serve(settings)
    logger.info("API server stopped")
    return 0


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    root.setLevel(level)


def _granian_log_config(level: str) -> dict[str, Any]:
    formatter = {"()": "logging.Formatter", "fmt": LOG_FORMAT}
    return {
        "formatters": {"generic": formatter, "access": formatter},
        "handlers": {
            "console": {
                "formatter": "generic",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "formatter": "access",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
            },
        },
        "loggers": {
            "_granian": {"handlers": ["console"], "level": level, "propagate": False},
            "granian.access": {"handlers": ["access"], "level": level, "propagate": False},
        },
    }


if __name__ == "__main__":
    raise SystemExit(main())
