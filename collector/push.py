"""Push mode: the collector is the webhook endpoint of a queue push subscription.

``POST /webhook`` receives a batch signed as Standard Webhooks do. The
collector responds (every error as ``application/problem+json``):

- 413 when the body is larger than ``MAX_BODY_BYTES``;
- 401 when the signature does not match a configured secret or the
  ``webhook-timestamp`` is more than 5 minutes away from its clock; nothing is stored;
- 400 when the body is not a JSON batch (``{"messages": [...]}``);
- 503 with ``Retry-After`` when the database is unreachable or locked, so the
  queue delivers the batch again later;
- 200 once the batch is committed with the same idempotent insert as pull
  mode (``store_records``), so a redelivered batch is stored once.

Messages whose body is not a valid telemetry record, or that the database
rejects, are counted in ``telemetry_collector_messages_rejected_total``,
logged and acknowledged with the rest of the batch.

The health, readiness and metrics endpoints of pull mode are served on the
same port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from typing import Any

import msgspec
import orjson
import uvicorn
from prometheus_client import Counter
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from collector.http import create_health_app
from collector.metrics import CollectorMetrics
from collector.storage import StoreResult, store_records
from telemetry.database import make_engine
from telemetry.queue_client import QueueClient, QueueError, decode_json
from telemetry.record import InvalidRecord, TelemetryRecord
from telemetry.settings import InvalidConfig, env_float, env_int, env_str
from telemetry.webhooks import (
    DEFAULT_TOLERANCE_S,
    InvalidSecret,
    InvalidSignature,
    secret_key,
    verify,
)

__all__ = [
    "WEBHOOK_PATH",
    "PushReceiver",
    "PushSettings",
    "WebhookServer",
    "add_push_arguments",
    "create_push_app",
    "problem_response",
    "push_settings",
    "register_subscription",
    "run_push_mode",
    "serve_push",
]

logger = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhook"
PROBLEM_CONTENT_TYPE = "application/problem+json"
#: Largest accepted request body: 1000 messages of a few KB each fit well below it.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Retry-After sent while the database fails, in seconds.
DATABASE_RETRY_AFTER_S = 5
#: Seconds between warnings about rejected signatures; the ones in between are counted.
WARNING_INTERVAL_S = 60.0


class PushReceiver:
    """Verifies and stores webhook deliveries.

    ``secrets`` may be replaced while serving (after registration hands out a
    secret). It offers ``engine``, ``database_failing`` and ``metrics`` like
    ``Collector``, so the health endpoints serve either.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        secrets: Sequence[str] = (),
        metrics: CollectorMetrics | None = None,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.secrets = list(secrets)
        self.metrics = metrics or CollectorMetrics()
        self.tolerance_s = tolerance_s
        self.clock = clock
        self.database_failing = False
        self._last_warning: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.requests = _request_counter(self.metrics)

    async def handle(self, request: Request) -> Response:
        body = await _read_body(request)
        if body is None:
            return self._problem(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            webhook_id = verify(self.secrets, request.headers, body, now=self.clock(), tolerance_s=self.tolerance_s)
        except InvalidSignature as exc:
            self._warn(exc.reason, "rejected a webhook request: %s", exc)
            return self._problem(401, str(exc))

        messages = _messages(body)
        if messages is None:
            self._warn("invalid_body", "webhook %s has no JSON 'messages' list", webhook_id)
            return self._problem(400, "expected a JSON object with a 'messages' list")
        records, rejected = self._validate(messages)
        self.metrics.messages_leased.inc(len(messages))
        self.metrics.batch_size.observe(len(messages))

        started = time.perf_counter()
        try:
            result, refused = await asyncio.to_thread(self._store, records)
        except SQLAlchemyError as exc:
            self.metrics.database_errors.inc()
            if not self.database_failing:
                logger.warning("storing webhook %s failed, asking the queue to retry: %s", webhook_id, _short(exc))
            self.database_failing = True
            return self._problem(503, "the database is unavailable", retry_after=DATABASE_RETRY_AFTER_S)
        if self.database_failing:
            logger.info("database writable again")
        self.database_failing = False

        for record, error in refused:
            rejected.append({"key": record.key, "reason": "rejected_by_database"})
            self._reject("rejected_by_database", record.key, error)
        self.metrics.batch_commit_seconds.observe(time.perf_counter() - started)
        self.metrics.messages_stored.inc(result.stored)
        self.metrics.duplicates_ignored.inc(result.duplicates)
        self.metrics.messages_acked.inc(len(messages))
        self._observe_lag(messages)
        logger.debug("webhook %s committed: %d stored, %d duplicates", webhook_id, result.stored, result.duplicates)
        return self._answer(200, {"stored": result.stored, "duplicates": result.duplicates, "rejected": rejected})

    def _validate(self, messages: list[Any]) -> tuple[list[TelemetryRecord], list[dict[str, Any]]]:
        records: list[TelemetryRecord] = []
        rejected: list[dict[str, Any]] = []
        for message in messages:
            message_id = message.get("id") if isinstance(message, dict) else None
            try:
                if not isinstance(message, dict) or "body" not in message:
                    raise InvalidRecord("invalid_message", "delivered message has no 'body'")
                records.append(TelemetryRecord.parse_body(message["body"]))
            except InvalidRecord as exc:
                rejected.append({"id": message_id, "reason": exc.reason})
                self._reject(exc.reason, message_id, str(exc))
        return records, rejected

    def _store(self, records: Sequence[TelemetryRecord]) -> tuple[StoreResult, list[tuple[TelemetryRecord, str]]]:
        """Store records; when the database rejects a value, store the others one by one."""
        try:
            return store_records(self.engine, records), []
        except (DataError, IntegrityError) as exc:
            logger.debug("the database rejected a value of the batch (%s); storing records one by one", _short(exc))
        stored = duplicates = 0
        refused: list[tuple[TelemetryRecord, str]] = []
        for record in records:
            try:
                single = store_records(self.engine, [record])
            except (DataError, IntegrityError) as exc:
                refused.append((record, _short(exc)))
                continue
            stored += single.stored
            duplicates += single.duplicates
        return StoreResult(stored=stored, duplicates=duplicates), refused

    def _reject(self, reason: str, message_id: Any, detail: str) -> None:
        self.metrics.messages_rejected.labels(reason).inc()
        self._warn(reason, "message %s not stored, reason %s: %s", message_id, reason, detail)

    def _warn(self, key: str, message: str, *args: Any) -> None:
        """Log a warning at most once per ``WARNING_INTERVAL_S`` per key, with the count in between."""
        now = time.monotonic()
        last = self._last_warning.get(key)
        if last is not None and now - last < WARNING_INTERVAL_S:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last_warning[key] = now
        suppressed = self._suppressed.pop(key, 0)
        more = f" ({suppressed} more since the last warning)" if suppressed else ""
        logger.warning(message + more, *args)

    def _answer(self, status: int, body: dict[str, Any]) -> Response:
        self.requests.labels(str(status)).inc()
        return JSONResponse(body, status_code=status)

    def _problem(self, status: int, detail: str, *, retry_after: int | None = None) -> Response:
        self.requests.labels(str(status)).inc()
        headers = {"retry-after": str(retry_after)} if retry_after is not None else None
        return problem_response(status, detail, headers=headers)

    def _observe_lag(self, messages: list[Any]) -> None:
        published = [m.get("published_at") for m in messages if isinstance(m, dict)]
        times = []
        for value in published:
            with contextlib.suppress(TypeError, ValueError):
                times.append(_parse_time(value))
        if times:
            self.metrics.lag_seconds.set(max(0.0, time.time() - min(times)))


def create_push_app(receiver: PushReceiver) -> Starlette:
    """Build the app of push mode: ``POST /webhook`` and the health and metrics endpoints.

    Errors raised by routing, such as 405 for a GET of the webhook, are problem+json too.
    """
    health = create_health_app(receiver)
    return Starlette(
        routes=[*health.routes, Route(WEBHOOK_PATH, receiver.handle, methods=["POST"])],
        exception_handlers={HTTPException: _http_exception},
    )


def problem_response(status: int, detail: str, headers: Mapping[str, str] | None = None) -> Response:
    """Build an RFC 9457 problem details response (``application/problem+json``)."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return problem_response(exc.status_code, exc.detail, headers=exc.headers)


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the collector's entry point."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebhookServer:
    """Serves ``create_push_app`` on ``host:port`` inside the running event loop; port 0 picks one."""

    def __init__(self, receiver: PushReceiver, *, host: str, port: int) -> None:
        self._socket = socket.create_server((host, port))
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(create_push_app(receiver), log_config=None, access_log=False, lifespan="off")
        self._server = _EmbeddedServer(config)

    async def serve(self) -> None:
        """Serve until ``stop``; requests in progress finish first (each after its commit)."""
        logger.info(
            "webhook, health and metrics endpoints on http://%s:%d (webhook path %s)",
            self.host,
            self.port,
            WEBHOOK_PATH,
        )
        await self._server.serve(sockets=[self._socket])

    def stop(self) -> None:
        self._server.should_exit = True


async def register_subscription(
    queue: QueueClient,
    *,
    queue_name: str,
    subscription: str,
    endpoint: str,
    secret: str | None,
    settings: dict[str, Any],
    stop: asyncio.Event,
    initial_backoff_s: float = 0.5,
    max_backoff_s: float = 10.0,
) -> str | None:
    """Create the queue if missing and create or update the push subscription to ``endpoint``.

    With ``secret`` every replica registers the same secret. Without it the
    queue's generated secret is used: the one shown at creation or, when the
    subscription exists, a new one from a rotation (the previous secret keeps
    signing for the queue's default overlap). Retries queue failures with
    backoff until it succeeds or ``stop`` is set; returns the secret, or
    ``None`` when stopped first.
    """
    attempt = 0
    while not stop.is_set():
        try:
            await queue.create_queue(queue_name)
            fields = {"endpoint": endpoint, **settings}
            if secret is not None:
                fields["secret"] = secret
            described = await queue.put_subscription(queue_name, subscription, **fields)
            if secret is not None:
                chosen = secret
            elif "secret" in described:
                chosen = described["secret"]
            else:
                chosen = (await queue.rotate_subscription_secret(queue_name, subscription))["secret"]
            logger.info(
                "push subscription %r of queue %r delivers to %s (secret %s)",
                subscription,
                queue_name,
                endpoint,
                "from COLLECTOR_WEBHOOK_SECRET" if secret is not None else "generated by the queue",
            )
            return str(chosen)
        except QueueError as exc:
            attempt += 1
            delay = min(max_backoff_s, initial_backoff_s * 2 ** (attempt - 1))
            logger.warning("registering push subscription %r failed (%s), retry in %.1f s", subscription, exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class PushSettings:
    """Options of push mode; ``register_url=None`` leaves the subscription to the operator."""

    host: str
    port: int
    secrets: tuple[str, ...]
    register_url: str | None
    queue: str
    subscription: str
    batch_size: int
    max_concurrency: int
    timeout_s: float


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the push-mode flags; their defaults come from the environment, read now."""
    parser.add_argument(
        "--mode",
        default=env_str("COLLECTOR_MODE", "pull"),
        help="pull: lease batches from the queue; push: serve POST /webhook for a queue push "
        "subscription (COLLECTOR_MODE, default %(default)s)",
    )
    parser.add_argument(
        "--register-url",
        default=env_str("COLLECTOR_REGISTER_URL", ""),
        help="push mode: URL at which the queue reaches this collector's /webhook; when set, the "
        "collector creates or updates the subscription at start, which needs a queue token with "
        "the admin scope (COLLECTOR_REGISTER_URL, default none)",
    )
    parser.add_argument(
        "--subscription",
        default=env_str("COLLECTOR_SUBSCRIPTION", "collectors"),
        help="push mode: name of the push subscription to register (COLLECTOR_SUBSCRIPTION, "
        "default %(default)s)",
    )
    parser.add_argument(
        "--push-max-concurrency",
        type=int,
        default=env_int("COLLECTOR_PUSH_MAX_CONCURRENCY", 4),
        help="push mode: maximum deliveries the queue has in flight to the subscription, 1 to 64 "
        "(COLLECTOR_PUSH_MAX_CONCURRENCY, default %(default)s)",
    )
    parser.add_argument(
        "--push-timeout-s",
        type=float,
        default=env_float("COLLECTOR_PUSH_TIMEOUT_S", 30.0),
        help="push mode: how long the queue waits for this collector to store a batch, in seconds "
        "(COLLECTOR_PUSH_TIMEOUT_S, default %(default)s)",
    )
    parser.epilog = (
        "Push mode verifies deliveries with COLLECTOR_WEBHOOK_SECRET (comma-separated 'whsec_...' "
        "secrets; the first one is registered). It has no flag, so it stays out of process listings."
    )


def push_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> PushSettings:
    """Check the push-mode options and read COLLECTOR_WEBHOOK_SECRET.

    Raise ``InvalidConfig`` for an option out of range, ``ValueError`` naming the
    variables for a missing or invalid secret.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("COLLECTOR_WEBHOOK_SECRET", "")
    secrets = tuple(item.strip() for item in raw.split(",") if item.strip())
    for secret in secrets:
        try:
            secret_key(secret)
        except InvalidSecret as exc:
            raise ValueError(f"COLLECTOR_WEBHOOK_SECRET is invalid: {exc}") from exc
    if not secrets and not args.register_url:
        raise ValueError(
            "push mode needs COLLECTOR_WEBHOOK_SECRET, --register-url (COLLECTOR_REGISTER_URL) or both: "
            "without either the collector cannot verify deliveries"
        )
    if not 1 <= args.push_max_concurrency <= 64:
        raise InvalidConfig("push_max_concurrency", args.push_max_concurrency, "1 to 64")
    if not 0.1 <= args.push_timeout_s <= 300:
        raise InvalidConfig("push_timeout_s", args.push_timeout_s, "0.1 to 300 seconds")
    return PushSettings(
        host=args.host,
        port=args.port,
        secrets=secrets,
        register_url=args.register_url or None,
        queue=args.queue,
        subscription=args.subscription,
        batch_size=args.batch_size,
        max_concurrency=args.push_max_concurrency,
        timeout_s=args.push_timeout_s,
    )


async def run_push_mode(args: argparse.Namespace, settings: PushSettings) -> None:
    """Run push mode with the database and queue of ``args``; close both afterwards."""
    engine = make_engine(args.database_url)
    queue = QueueClient(args.queue_urls, token=args.queue_token or None, http2=args.queue_http2, timeout_s=30.0)
    try:
        await serve_push(settings, engine, queue)
    finally:
        await queue.aclose()
        engine.dispose()


async def serve_push(settings: PushSettings, engine: Engine, queue: QueueClient) -> None:
    """Serve the webhook until SIGTERM or SIGINT, registering the subscription first when asked to.

    The server listens before registering, so the first delivery finds it.
    """
    receiver = PushReceiver(engine, secrets=settings.secrets)
    try:
        server = WebhookServer(receiver, host=settings.host, port=settings.port)
    except OSError as exc:
        raise SystemExit(
            f"telemetry-collector: cannot listen on {settings.host}:{settings.port} ({exc}); "
            "set COLLECTOR_PORT to a free port, or 0 for any free port"
        ) from exc
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        logger.info("received %s: finishing requests in progress", signal.Signals(signum).name)
        stop.set()
        server.stop()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    serving = asyncio.create_task(server.serve(), name="collector-webhook")
    if settings.register_url:
        secret = await register_subscription(
            queue,
            queue_name=settings.queue,
            subscription=settings.subscription,
            endpoint=settings.register_url,
            secret=settings.secrets[0] if settings.secrets else None,
            settings={
                "batch_size": settings.batch_size,
                "max_concurrency": settings.max_concurrency,
                "timeout_s": settings.timeout_s,
            },
            stop=stop,
        )
        if secret is not None and secret not in receiver.secrets:
            receiver.secrets = [secret, *receiver.secrets]
    await serving
    logger.info("collector stopped")


def _request_counter(metrics: CollectorMetrics) -> Counter:
    return Counter(
        "telemetry_collector_webhook_requests",
        "Webhook requests answered, by HTTP status.",
        ["status"],
        registry=metrics.registry,
    )


async def _read_body(request: Request) -> bytes | None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _messages(body: bytes) -> list[Any] | None:
    try:
        data = decode_json(body)
    except msgspec.DecodeError:
        return None
    messages = data.get("messages") if isinstance(data, dict) else None
    return messages if isinstance(messages, list) else None


def _parse_time(value: Any) -> float:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _short(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return f"{type(original).__name__}: {lines[0] if lines else ''}"
