"""Running the service under granian's embedded server, in this process.

The embedded server runs the application on this process's event loop, so
there are no worker processes. A ``kill -9`` of this process therefore also
closes the port and releases the write-ahead log's lock.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable

from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP2Settings
from granian.log import LogLevels
from granian.server.embed import Server

from queue_server.auth import load_tokens
from queue_server.errors import StorageError
from queue_server.http.app import create_app
from queue_server.push.guard import EndpointGuard
from queue_server.push.service import PushService
from queue_server.service import QueueService, ServiceOptions
from queue_server.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds a SIGTERM waits for running requests (long-polls end at once) before closing connections.
SHUTDOWN_GRACE_S = 10.0
#: Seconds granian may then wait for clients to close their connections.
CONNECTION_CLOSE_TIMEOUT_S = 3

#: Larger HTTP/2 flow-control windows than the default let 281 KB publish batches flow without stalls.
#: A 1 MiB maximum frame size lets a client send such a batch as one DATA frame
#: instead of 16 KiB frames, each of which costs a Python HTTP/2 client a socket write.
HTTP2 = HTTP2Settings(
    initial_connection_window_size=8 * 1024 * 1024,
    initial_stream_window_size=4 * 1024 * 1024,
    max_concurrent_streams=200,
    max_frame_size=1024 * 1024,
)


def build_server(settings: Settings, app: object) -> Server:
    return Server(
        app,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGINL,
        http=HTTPModes.auto,
        http2_settings=HTTP2,
        websockets=False,
        log_enabled=True,
        log_level=LogLevels(settings.log_level.lower()),
        log_dictconfig={"loggers": {"_granian": {"handlers": [], "propagate": True}}},
        ssl_cert=settings.tls_cert,
        ssl_key=settings.tls_key,
    )


async def serve(settings: Settings) -> int:
    """Recover the log, serve until SIGTERM or SIGINT, then stop cleanly; return the exit code."""
    tokens = load_tokens(settings.tokens, settings.tokens_file)
    service = QueueService(
        ServiceOptions(
            data_dir=settings.data_dir,
            fsync=settings.fsync,
            fsync_interval_s=settings.fsync_interval_s,
            segment_bytes=settings.segment_bytes,
            min_free_bytes=settings.min_free_bytes,
        )
    )
    try:
        _check_port_free(settings.host, settings.port)
    except OSError as exc:
        logger.error("cannot serve on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    # Created before ``open``, which replays the subscriptions into it.
    guard = EndpointGuard(
        allowed_networks=settings.push_allowed_networks, allowed_hosts=settings.push_allowed_hosts
    )
    push = PushService(service, guard=guard)
    # Recovery runs on a thread so that a SIGTERM during it is noted and ends the
    # start-up cleanly once the log has been read.
    loop = asyncio.get_running_loop()
    early_signals: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, early_signals.append, signum)
    try:
        await asyncio.to_thread(service.open)
    except (StorageError, OSError) as exc:
        logger.error("cannot open the data directory: %s", exc)
        return 1
    if early_signals:
        logger.info("received %s during recovery: stopping", signal.Signals(early_signals[0]).name)
        await service.close()
        return 0
    await service.start()
    push.start()
    app = create_app(service, tokens, push=push)
    server = build_server(settings, app)
    # granian waits for idle HTTP/2 connections to close when it stops; this bounds
    # the wait, after which the worker is cancelled and its connections dropped.
    server.workers_kill_timeout = CONNECTION_CLOSE_TIMEOUT_S
    _route_granian_logs()
    if tokens.open:
        logger.warning(
            "no QUEUE_TOKENS or QUEUE_TOKENS_FILE configured: every client that reaches %s:%d may "
            "publish, consume and administer queues",
            settings.host,
            settings.port,
        )

    async def stop_after_requests() -> None:
        if not await service.drain(SHUTDOWN_GRACE_S):
            logger.warning(
                "%d requests still running after %.0f s; closing their connections",
                service.active_requests,
                SHUTDOWN_GRACE_S,
            )
        # Give granian a moment to write the last responses before it closes connections.
        await asyncio.sleep(0.1)
        stop_server: Callable[[], None] = server.stop
        stop_server()

    stopping: list[asyncio.Task[None]] = []

    def stop(signum: int) -> None:
        logger.info("received %s: stopping", signal.Signals(signum).name)
        service.begin_shutdown()
        if not stopping:
            stopping.append(loop.create_task(stop_after_requests()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    scheme = "https" if settings.tls_cert else "http"
    logger.info(
        "queue server listening on %s://%s:%d (data %s, fsync %s)",
        scheme,
        settings.host,
        settings.port,
        settings.data_dir,
        settings.fsync.value,
    )
    if settings.push_allowed_networks or settings.push_allowed_hosts:
        logger.info(
            "push subscriptions may deliver to %s",
            ", ".join([*(str(network) for network in settings.push_allowed_networks), *settings.push_allowed_hosts]),
        )
    try:
        await server.serve()
    except TimeoutError:
        logger.warning(
            "clients kept connections open %.0f s after the stop; closed them", CONNECTION_CLOSE_TIMEOUT_S
        )
    except RuntimeError as exc:
        # granian reports a failed bind ("Address already in use") as RuntimeError.
        logger.error("cannot serve on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    finally:
        # NOTE: the service stops accepting acks at the signal, so a batch whose
        # POST is still in flight is delivered again after a restart.
        await push.close()
        await service.close()
    logger.info("queue server stopped")
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Raise ``OSError`` if something listens on ``host:port``.

    granian binds with SO_REUSEPORT, so a second server on a busy port would
    start and share the connections. A plain bind here fails instead.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def _route_granian_logs() -> None:
    granian_logger = logging.getLogger("_granian")
    granian_logger.handlers.clear()
    granian_logger.propagate = True
