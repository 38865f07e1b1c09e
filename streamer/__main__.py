"""Command line of the streamer: ``telemetry-streamer`` or ``python -m streamer``.

Every option has a ``STREAMER_*`` environment variable; a flag overrides it.
Exit status: 0 after a clean stop (SIGTERM, SIGINT, or the last pass done),
2 for invalid settings, an unusable CSV file or a request the queue rejects
(such as a missing or wrong token). A second SIGTERM or SIGINT
stops at once, and the shard in hand returns to the queue when its lease expires.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from streamer.http import bind_socket, make_app, make_server
from streamer.metrics import StreamerMetrics
from streamer.worker import (
    CONTROL_QUEUE,
    MAX_CONCURRENT_SHARDS,
    Streamer,
    StreamerConfig,
    StreamerError,
)
from telemetry.process import configure_garbage_collector
from telemetry.queue_client import QueueClient, QueueRequestError, RetryPolicy
from telemetry.settings import InvalidConfig, SettingsError, env_bool, env_float, env_int, env_str

logger = logging.getLogger("streamer")

#: The sample dump shipped with the package, streamed when no CSV file is given.
DEFAULT_CSV = Path(__file__).resolve().parent / "data" / "sample_dcgm.csv"

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Publishes are never given up: under backpressure the streamer waits instead of
# dropping rows. The backoff ceiling bounds how long a recovered queue stays idle.
PUBLISH_RETRY = RetryPolicy(max_attempts=None, max_elapsed_s=None, initial_backoff_s=0.1, max_backoff_s=5.0)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: Defaults of the streaming options, which the command line and environment override.
_DEFAULTS = StreamerConfig(csv_path=DEFAULT_CSV)


#: Environment variable and flag of each ``StreamerConfig`` field that the command
#: line sets, to name them when the config rejects a value.
CONFIG_SOURCES = {
    "interval_s": ("STREAMER_INTERVAL_S", "--interval"),
    "rate": ("STREAMER_RATE", "--rate"),
    "batch_size": ("STREAMER_BATCH_SIZE", "--batch-size"),
    "passes": ("STREAMER_PASSES", "--passes"),
    "rows_per_shard": ("STREAMER_ROWS_PER_SHARD", "--rows-per-shard"),
    "lease_timeout_s": ("STREAMER_LEASE_TIMEOUT_S", "--lease-timeout"),
    "concurrent_shards": ("STREAMER_CONCURRENT_SHARDS", "--concurrent-shards"),
    "cache_rows": ("STREAMER_CACHE_ROWS", "--cache-rows"),
}

#: Environment variable and flag of every option that an ``InvalidConfig`` can name.
OPTION_SOURCES = {
    "queue_urls": ("STREAMER_QUEUE_URLS", "--queue-urls"),
    "port": ("STREAMER_PORT", "--port"),
    "log_level": ("STREAMER_LOG_LEVEL", "--log-level"),
    **CONFIG_SOURCES,
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser; defaults come from the ``STREAMER_*`` variables."""
    parser = argparse.ArgumentParser(
        prog="telemetry-streamer",
        description=(
            "Stream the rows of a DCGM exporter CSV dump to the telemetry queue, pass after pass, "
            "sharing the work with every other streamer of the same file."
        ),
    )
    option = parser.add_argument
    option("--queue-urls", default=env_str("STREAMER_QUEUE_URLS", "http://127.0.0.1:8500"),
           help="comma-separated queue node URLs [STREAMER_QUEUE_URLS, default %(default)s]")
    option("--queue-token", default=env_str("STREAMER_QUEUE_TOKEN", ""),
           help="bearer token with the publish, consume and admin scopes; admin creates the queues "
                "[STREAMER_QUEUE_TOKEN]")
    option("--queue-http2", action=argparse.BooleanOptionalAction,
           default=env_bool("STREAMER_QUEUE_HTTP2", True),
           help="speak HTTP/2 to the queue (cleartext with prior knowledge on http://) "
                "[STREAMER_QUEUE_HTTP2, default %(default)s]")

    option("--csv", type=Path, default=Path(env_str("STREAMER_CSV", str(DEFAULT_CSV))),
           help="DCGM CSV dump to stream [STREAMER_CSV, default: the bundled sample]")
    option("--interval", type=float, default=env_float("STREAMER_INTERVAL_S", _DEFAULTS.interval_s),
           help="seconds between pass starts; 0 streams as fast as the queue accepts "
                "[STREAMER_INTERVAL_S, default %(default)s]")
    option("--rate", type=float, default=env_float("STREAMER_RATE", _DEFAULTS.rate),
           help="maximum rows per second this streamer publishes, 0 for no cap "
                "[STREAMER_RATE, default %(default)s]")
    option("--batch-size", type=int, default=env_int("STREAMER_BATCH_SIZE", _DEFAULTS.batch_size),
           help="rows per publish request, 1 to 1000 [STREAMER_BATCH_SIZE, default %(default)s]")
    option("--passes", type=int, default=env_int("STREAMER_PASSES", _DEFAULTS.passes),
           help="passes over the file, 0 for no end [STREAMER_PASSES, default %(default)s]")

    option("--rows-per-shard", type=int, default=env_int("STREAMER_ROWS_PER_SHARD", _DEFAULTS.rows_per_shard),
           help="rows in one shard, the unit of work sharing [STREAMER_ROWS_PER_SHARD, default %(default)s]")
    option("--control-queue", default=env_str("STREAMER_CONTROL_QUEUE", CONTROL_QUEUE),
           help="queue of the shard messages, one per CSV file "
                "[STREAMER_CONTROL_QUEUE, default %(default)s]")
    option("--lease-timeout", type=float, default=env_float("STREAMER_LEASE_TIMEOUT_S", _DEFAULTS.lease_timeout_s),
           help="seconds after which a crashed streamer's shard goes to another streamer "
                "[STREAMER_LEASE_TIMEOUT_S, default %(default)s]")
    option("--concurrent-shards", type=int, default=env_int("STREAMER_CONCURRENT_SHARDS", _DEFAULTS.concurrent_shards),
           help=f"shards worked on at the same time, 1 to {MAX_CONCURRENT_SHARDS}, so one shard's "
                "control requests overlap another's publishing "
                "[STREAMER_CONCURRENT_SHARDS, default %(default)s]")
    option("--cache-rows", type=int, default=env_int("STREAMER_CACHE_ROWS", _DEFAULTS.cache_rows),
           help="rows of the file kept parsed for the next passes while it is unchanged, "
                "about 1.2 KiB each; 0 to parse every pass [STREAMER_CACHE_ROWS, default %(default)s]")

    option("--host", default=env_str("STREAMER_HOST", "127.0.0.1"),
           help="bind address of the health and metrics endpoints [STREAMER_HOST, default %(default)s]")
    option("--port", type=int, default=env_int("STREAMER_PORT", 9101),
           help="port of the health and metrics endpoints, 0 to 65535; 0 for any free port "
                "[STREAMER_PORT, default %(default)s]")
    option("--log-level", default=env_str("STREAMER_LOG_LEVEL", "INFO"),
           help="logging level: DEBUG, INFO, WARNING or ERROR [STREAMER_LOG_LEVEL, default %(default)s]")
    return parser


def build_config(args: argparse.Namespace) -> StreamerConfig:
    """Build the streamer's config from the parsed options. Raise ``InvalidConfig`` for a value out of range."""
    return StreamerConfig(
        csv_path=args.csv,
        interval_s=args.interval,
        rate=args.rate,
        batch_size=args.batch_size,
        passes=args.passes,
        rows_per_shard=args.rows_per_shard,
        control_queue=args.control_queue,
        lease_timeout_s=args.lease_timeout,
        concurrent_shards=args.concurrent_shards,
        cache_rows=args.cache_rows,
    )


async def serve(args: argparse.Namespace, config: StreamerConfig) -> None:
    """Run the streamer and its HTTP endpoints until the streamer returns."""
    metrics = StreamerMetrics()
    queue = QueueClient(
        args.queue_urls, token=args.queue_token or None, http2=args.queue_http2, retry=PUBLISH_RETRY
    )
    streamer = Streamer(queue, config, metrics=metrics)
    try:
        streamer.check_input()
    except StreamerError as exc:
        await queue.aclose()
        raise StreamerError(f"STREAMER_CSV / --csv is invalid: {exc}") from exc
    server = make_server(
        make_app(metrics.registry, lambda: streamer.ready and not streamer.stopping),
        host=args.host,
        port=args.port,
    )

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        await queue.aclose()
        raise StreamerError(
            f"cannot serve health and metrics on {args.host}:{args.port} ({exc}); "
            "choose a free port with --port or STREAMER_PORT (0 picks one)"
        ) from exc
    http_task = asyncio.create_task(server.serve(sockets=[sock]))
    logger.info(
        "streamer of %s started; health and metrics on http://%s:%d, queue %s",
        config.csv_path,
        args.host,
        sock.getsockname()[1],
        args.queue_urls,
    )

    loop = asyncio.get_running_loop()
    work = asyncio.create_task(streamer.run())

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not streamer.ready:
            # Before the run is joined there is no shard to hand back, and a
            # queue that cannot be reached would keep the start-up retrying.
            logger.info("%s before the streamer joined a run: stopping at once", name)
            streamer.request_stop()
            work.cancel()
        elif streamer.stopping:
            logger.warning("second %s: stopping at once", name)
            work.cancel()
        else:
            streamer.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    try:
        await work
    except asyncio.CancelledError:
        if not streamer.stopping:
            raise
    finally:
        server.should_exit = True
        await http_task
        await queue.aclose()
    logger.info("streamer stopped")


def check_options(args: argparse.Namespace) -> None:
    """Raise ``InvalidConfig`` for an option out of range that ``StreamerConfig`` does not check."""
    if not any(url.strip() for url in args.queue_urls.split(",")):
        raise InvalidConfig("queue_urls", args.queue_urls, "one or more comma-separated URLs")
    if not 0 <= args.port <= 65535:
        raise InvalidConfig("port", args.port, "0 to 65535")
    if args.log_level.upper() not in LOG_LEVELS:
        raise InvalidConfig("log_level", args.log_level, "one of " + ", ".join(LOG_LEVELS))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``telemetry-streamer``; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SettingsError as exc:
        print(f"telemetry-streamer: {exc}", file=sys.stderr)
        return 2
    try:
        check_options(args)
        config = build_config(args)
    except InvalidConfig as exc:
        print(f"telemetry-streamer: {exc.describe(OPTION_SOURCES)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # httpx logs every request at INFO, thousands of lines a minute here.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    configure_garbage_collector()
    try:
        asyncio.run(serve(args, config))
    except StreamerError as exc:
        logger.error("%s", exc)
        return 2
    except QueueRequestError as exc:
        # 401, 403, 400 and the like: retrying cannot help, the settings must change.
        logger.error("the queue rejected a request: %s; check the queue URL, token and scopes", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
