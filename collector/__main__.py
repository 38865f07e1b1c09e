"""Entry point of ``telemetry-collector``: settings, logging, signals, the event loop.

Every flag has an environment variable (``COLLECTOR_*`` and ``DATABASE_URL``) that
sets its default; a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from collector.http import HealthServer
from collector.push import add_push_arguments, push_settings, run_push_mode
from collector.worker import Collector, CollectorConfig
from telemetry.database import DEFAULT_DATABASE_URL, make_engine
from telemetry.process import configure_garbage_collector
from telemetry.queue_client import QueueClient
from telemetry.record import TELEMETRY_QUEUE
from telemetry.settings import InvalidConfig, SettingsError, env_bool, env_float, env_int, env_str

logger = logging.getLogger("collector")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MODES = ("pull", "push")

#: The environment variable and flag that set each validated option.
OPTION_SOURCES = {
    "queue_urls": ("COLLECTOR_QUEUE_URLS", "--queue-urls"),
    "batch_size": ("COLLECTOR_BATCH_SIZE", "--batch-size"),
    "max_transaction_rows": ("COLLECTOR_MAX_TRANSACTION_ROWS", "--max-transaction-rows"),
    "max_merge_wait_s": ("COLLECTOR_MAX_MERGE_WAIT_S", "--max-merge-wait-s"),
    "wait_s": ("COLLECTOR_WAIT_S", "--wait-s"),
    "visibility_timeout_s": ("COLLECTOR_VISIBILITY_TIMEOUT_S", "--visibility-timeout-s"),
    "stop_timeout_s": ("COLLECTOR_STOP_TIMEOUT_S", "--stop-timeout-s"),
    "port": ("COLLECTOR_PORT", "--port"),
    "log_level": ("COLLECTOR_LOG_LEVEL", "--log-level"),
    "mode": ("COLLECTOR_MODE", "--mode"),
    "push_max_concurrency": ("COLLECTOR_PUSH_MAX_CONCURRENCY", "--push-max-concurrency"),
    "push_timeout_s": ("COLLECTOR_PUSH_TIMEOUT_S", "--push-timeout-s"),
}

#: Defaults of the pull-loop options, which the command line and environment override.
_DEFAULTS = CollectorConfig()


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser. Its defaults come from the environment, read at this call."""
    parser = argparse.ArgumentParser(
        prog="telemetry-collector",
        description="Lease telemetry records from the queue and store them in the database, "
        "idempotently, in batches of one transaction each.",
    )
    parser.add_argument(
        "--queue-urls",
        default=env_str("COLLECTOR_QUEUE_URLS", "http://127.0.0.1:8500"),
        help="comma-separated queue node URLs (COLLECTOR_QUEUE_URLS, default %(default)s)",
    )
    parser.add_argument(
        "--queue-token",
        default=env_str("COLLECTOR_QUEUE_TOKEN", ""),
        help="bearer token with the consume scope (COLLECTOR_QUEUE_TOKEN, default none)",
    )
    parser.add_argument(
        "--queue-http2",
        action=argparse.BooleanOptionalAction,
        default=env_bool("COLLECTOR_QUEUE_HTTP2", True),
        help="speak HTTP/2 to the queue, cleartext with prior knowledge on http:// "
        "(COLLECTOR_QUEUE_HTTP2, default %(default)s)",
    )
    parser.add_argument(
        "--queue",
        default=env_str("COLLECTOR_QUEUE", TELEMETRY_QUEUE),
        help="queue to collect from, created if missing (COLLECTOR_QUEUE, default %(default)s)",
    )
    parser.add_argument(
        "--database-url",
        default=env_str("DATABASE_URL", DEFAULT_DATABASE_URL),
        help="SQLAlchemy URL of the telemetry database (DATABASE_URL, default %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=env_int("COLLECTOR_BATCH_SIZE", _DEFAULTS.batch_size),
        help="maximum messages per lease and per transaction, 1 to 1000 "
        "(COLLECTOR_BATCH_SIZE, default %(default)s)",
    )
    parser.add_argument(
        "--max-transaction-rows",
        type=int,
        default=env_int("COLLECTOR_MAX_TRANSACTION_ROWS", _DEFAULTS.max_transaction_rows),
        help="maximum records written in one transaction, merged from the leased batches "
        "that are ready (COLLECTOR_MAX_TRANSACTION_ROWS, default %(default)s)",
    )
    parser.add_argument(
        "--max-merge-wait-s",
        type=float,
        default=env_float("COLLECTOR_MAX_MERGE_WAIT_S", _DEFAULTS.max_merge_wait_s),
        help="how long to wait for more leased batches to merge into a transaction, "
        "in seconds, 0 to 10 (COLLECTOR_MAX_MERGE_WAIT_S, default %(default)s)",
    )
    parser.add_argument(
        "--wait-s",
        type=float,
        default=env_float("COLLECTOR_WAIT_S", _DEFAULTS.wait_s),
        help="long-poll wait per lease request in seconds, 0 to 20 "
        "(COLLECTOR_WAIT_S, default %(default)s)",
    )
    parser.add_argument(
        "--visibility-timeout-s",
        type=float,
        default=env_float("COLLECTOR_VISIBILITY_TIMEOUT_S", _DEFAULTS.visibility_timeout_s),
        help="lease duration in seconds; leases in hand are extended before they expire "
        "(COLLECTOR_VISIBILITY_TIMEOUT_S, default %(default)s)",
    )
    parser.add_argument(
        "--stop-timeout-s",
        type=float,
        default=env_float("COLLECTOR_STOP_TIMEOUT_S", _DEFAULTS.stop_timeout_s),
        help="on SIGTERM, how long to keep retrying a failing database before the batches "
        "in hand go back to the queue, in seconds (COLLECTOR_STOP_TIMEOUT_S, default %(default)s)",
    )
    parser.add_argument(
        "--host",
        default=env_str("COLLECTOR_HOST", "127.0.0.1"),
        help="bind address of the health and metrics endpoints (COLLECTOR_HOST, default %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=env_int("COLLECTOR_PORT", 9102),
        help="port of the health and metrics endpoints, 0 to 65535; 0 picks a free port "
        "(COLLECTOR_PORT, default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default=env_str("COLLECTOR_LOG_LEVEL", "INFO"),
        type=str.upper,
        help="log level: DEBUG, INFO, WARNING or ERROR (COLLECTOR_LOG_LEVEL, default %(default)s)",
    )
    add_push_arguments(parser)
    return parser


async def serve(args: argparse.Namespace, config: CollectorConfig) -> None:
    """Run the collector and its health server until SIGTERM or SIGINT."""
    engine = make_engine(args.database_url)
    queue = QueueClient(
        args.queue_urls,
        token=args.queue_token or None,
        http2=args.queue_http2,
        timeout_s=30.0,
    )
    collector = Collector(queue, engine, config=config)
    try:
        health = HealthServer(collector, host=args.host, port=args.port)
    except OSError as exc:
        await queue.aclose()
        engine.dispose()
        raise SystemExit(
            f"telemetry-collector: cannot listen on {args.host}:{args.port} ({exc}); "
            "set COLLECTOR_PORT to a free port, or 0 for any free port"
        ) from exc

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, collector, signum)

    health_task = asyncio.create_task(health.serve(), name="collector-health")
    try:
        await collector.run()
    finally:
        health.stop()
        await health_task
        await queue.aclose()
        engine.dispose()


def _on_signal(collector: Collector, signum: int) -> None:
    logger.info("received %s", signal.Signals(signum).name)
    collector.request_stop()


def check_options(args: argparse.Namespace) -> None:
    """Check the options that ``CollectorConfig`` and ``push_settings`` leave unchecked.

    Raise ``InvalidConfig`` for an option out of range, or ``ValueError`` for an
    unparsable database URL.

    Flag values of ``--log-level`` and ``--mode`` are checked here rather than by
    argparse ``choices``, because argparse does not check a default taken from the
    environment.
    """
    if args.log_level not in LOG_LEVELS:
        raise InvalidConfig("log_level", args.log_level, "one of " + ", ".join(LOG_LEVELS))
    if args.mode not in MODES:
        raise InvalidConfig("mode", args.mode, "one of " + ", ".join(MODES))
    if not 0 <= args.port <= 65535:
        raise InvalidConfig("port", args.port, "0 to 65535")
    if not [url for url in args.queue_urls.split(",") if url.strip()]:
        raise InvalidConfig("queue_urls", args.queue_urls, "one or more comma-separated URLs")
    try:
        make_url(args.database_url)
    except ArgumentError as exc:
        # The URL is left out of the message because it may contain a password.
        raise ValueError(
            "DATABASE_URL / --database-url is invalid: expected an SQLAlchemy URL such as "
            "sqlite:///data/telemetry.db or postgresql://user@host/dbname"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the settings, configure logging and run the collector. Return the exit status."""
    try:
        parser = build_parser()
    except SettingsError as exc:
        print(f"telemetry-collector: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)

    try:
        check_options(args)
        config = CollectorConfig(
            queue=args.queue,
            batch_size=args.batch_size,
            wait_s=args.wait_s,
            visibility_timeout_s=args.visibility_timeout_s,
            stop_timeout_s=args.stop_timeout_s,
            max_transaction_rows=args.max_transaction_rows,
            max_merge_wait_s=args.max_merge_wait_s,
        )
        push = push_settings(args) if args.mode == "push" else None
    except InvalidConfig as exc:
        parser.error(exc.describe(OPTION_SOURCES))
    except ValueError as exc:
        parser.error(str(exc))

    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    # httpx logs every request at INFO: thousands of lines a minute here.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    configure_garbage_collector()
    logger.info(
        "starting: queue %r at %s, database %s",
        args.queue,
        args.queue_urls,
        make_url(args.database_url).render_as_string(hide_password=True),
    )
    if push is None:
        asyncio.run(serve(args, config))
        return 0
    logger.info("push mode: serving the webhook on %s:%d", args.host, args.port)
    asyncio.run(run_push_mode(args, push))
    return 0


if __name__ == "__main__":
    sys.exit(main())
