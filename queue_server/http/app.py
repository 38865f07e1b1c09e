"""The Starlette application: one route per API operation, problem+json errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from queue_server.auth import Scope, Tokens
from queue_server.core.broker import MAX_BATCH_MESSAGES
from queue_server.core.config import MAX_VISIBILITY_TIMEOUT_S, check_queue_name
from queue_server.core.queue import Queue
from queue_server.errors import InvalidRequest, QueueServerError, RetryLater
from queue_server.http.requests import (
    MAX_DELAY_S,
    MAX_OTHER_BYTES,
    MAX_PUBLISH_BYTES,
    MAX_REASON_LENGTH,
    MAX_WAIT_S,
    integer_field,
    number_field,
    parse_publish_body,
    read_body,
    read_json,
    receipts_field,
    reject_unknown,
    require_object,
)
from queue_server.metrics import build_registry
from queue_server.push.routes import subscription_routes
from queue_server.push.service import PushService
from queue_server.service import QueueService

logger = logging.getLogger(__name__)

JSON = "application/json"


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=JSON)


def problem_response(error: QueueServerError) -> Response:
    body = {"type": "about:blank", "title": error.title, "status": error.status, "detail": str(error)}
    headers = {}
    if isinstance(error, RetryLater):
        headers["retry-after"] = str(error.retry_after_s)
    return Response(
        orjson.dumps(body), status_code=error.status, media_type="application/problem+json", headers=headers
    )


def queue_json(queue: Queue, now: float) -> dict[str, Any]:
    oldest = queue.oldest_ready_published_at()
    totals = queue.totals
    return {
        "name": queue.name,
        **queue.config.to_json(),
        "stats": {
            "ready": queue.ready,
            "leased": queue.leased,
            "delayed": queue.delayed,
            "oldest_ready_age_s": 0.0 if oldest is None else round(max(0.0, now - oldest), 3),
            "published_total": totals.published,
            "acked_total": totals.acked,
            "redelivered_total": totals.redelivered,
            "dead_lettered_total": totals.dead_lettered,
        },
    }


Handler = Callable[[Request], Awaitable[Response]]


async def _client_disconnected(request: Request) -> None:
    """Return once the client has closed the request; its body must already be read."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    service: QueueService, tokens: Tokens, *, manage_service: bool = False, push: PushService | None = None
) -> Starlette:
    """Build the application over ``service``, with the subscription API of ``push`` when given.

    With ``manage_service=True`` the app's lifespan opens the service and starts
    ``push`` at start-up, and closes both at shutdown, as in-process tests need.
    Otherwise the caller does.
    """
    registry = build_registry(service)
    if push is not None:
        push.metrics.register(registry)

    def guarded(scope: Scope | None, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            service.active_requests += 1
            try:
                tokens.check(request.headers.get("authorization"), scope)
                return await handler(request)
            except QueueServerError as error:
                if error.status >= 500 and not isinstance(error, RetryLater):
                    logger.error("%s %s failed: %s", request.method, request.url.path, error)
                return problem_response(error)
            finally:
                service.active_requests -= 1

        return endpoint

    async def list_queues(request: Request) -> Response:
        import time

        now = time.time()
        return json_response({"queues": [queue_json(q, now) for q in service.broker.queues.values()]})

    async def get_queue(request: Request) -> Response:
        import time

        return json_response(queue_json(service.queue(request.path_params["name"]), time.time()))

    async def put_queue(request: Request) -> Response:
        name = check_queue_name(request.path_params["name"])
        fields = require_object(await read_json(request, MAX_OTHER_BYTES), "queue configuration")
        config, created = await service.put_queue(name, fields)
        return json_response({"name": name, **config.to_json()}, 201 if created else 200)

    async def delete_queue(request: Request) -> Response:
        await service.delete_queue(request.path_params["name"])
        return Response(status_code=204)

    async def publish(request: Request) -> Response:
        name = request.path_params["name"]
        service.queue(name)
        bodies, keys, delays = parse_publish_body(await read_body(request, MAX_PUBLISH_BYTES), MAX_BATCH_MESSAGES)
        results = await service.publish(name, bodies, keys, delays)
        return json_response({"results": [{"id": i, "duplicate": d} for i, d in results]})

    async def lease(request: Request) -> Response:
        name = request.path_params["name"]
        service.queue(name)
        data = require_object(await read_json(request, MAX_OTHER_BYTES), "lease request")
        reject_unknown(data, {"max_messages", "wait_s", "visibility_timeout_s"}, "lease request")
        max_messages = integer_field(data, "max_messages", 1, 1, MAX_BATCH_MESSAGES)
        wait_s = number_field(data, "wait_s", 0.0, 0, MAX_WAIT_S)
        visibility = number_field(data, "visibility_timeout_s", None, 0.001, MAX_VISIBILITY_TIMEOUT_S)
        leasing = asyncio.ensure_future(service.lease(name, max_messages or 1, wait_s or 0.0, visibility))
        if wait_s:
            # A client that goes away while it waits, as a consumer does when it
            # stops, must not be handed messages that no consumer will receive.
            left = asyncio.ensure_future(_client_disconnected(request))
            try:
                await asyncio.wait({leasing, left}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                left.cancel()
            if not leasing.done():
                leasing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await leasing
                logger.debug("long-poll on queue %r ended: the client disconnected", name)
                return Response(status_code=499)
        body = await leasing
        return Response(body, media_type=JSON)

    def results_response(results: list[tuple[Any, str]]) -> Response:
        return json_response({"results": [{"receipt": r, "status": s} for r, s in results]})

    async def ack(request: Request) -> Response:
        name = request.path_params["name"]
        service.queue(name)
        data = require_object(await read_json(request, MAX_OTHER_BYTES), "ack request")
        reject_unknown(data, {"receipts"}, "ack request")
        return results_response(await service.ack(name, receipts_field(data)))

    async def nack(request: Request) -> Response:
        name = request.path_params["name"]
        service.queue(name)
        data = require_object(await read_json(request, MAX_OTHER_BYTES), "nack request")
        reject_unknown(data, {"receipts", "delay_s", "dead_letter", "reason"}, "nack request")
        receipts = receipts_field(data)
        delay = number_field(data, "delay_s", 0.0, 0, MAX_DELAY_S) or 0.0
        dead_letter = data.get("dead_letter", False)
        if not isinstance(dead_letter, bool):
            raise InvalidRequest(f"dead_letter={dead_letter!r} is invalid: expected true or false")
        reason = data.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH):
            raise InvalidRequest(
                f"reason={reason!r:.80} is invalid: expected a string of at most {MAX_REASON_LENGTH} characters or null"
            )
        results = await service.nack(name, receipts, delay_s=delay, dead_letter=dead_letter, reason=reason)
        return results_response(results)

    async def extend(request: Request) -> Response:
        name = request.path_params["name"]
        service.queue(name)
        data = require_object(await read_json(request, MAX_OTHER_BYTES), "extend request")
        reject_unknown(data, {"receipts", "visibility_timeout_s"}, "extend request")
        receipts = receipts_field(data)
        if "visibility_timeout_s" not in data:
            raise InvalidRequest("extend request has no 'visibility_timeout_s': give the new lease length in seconds")
        visibility = number_field(data, "visibility_timeout_s", None, 0.001, MAX_VISIBILITY_TIMEOUT_S)
        return results_response(await service.extend(name, receipts, visibility or 0.001))

    async def redrive(request: Request) -> Response:
        name = request.path_params["name"]
        service.queue(name)
        data = require_object(await read_json(request, MAX_OTHER_BYTES), "redrive request")
        reject_unknown(data, {"max_messages"}, "redrive request")
        max_messages = integer_field(data, "max_messages", None, 1, 1_000_000)
        return json_response({"redriven": await service.redrive(name, max_messages)})

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if service.ready:
            return json_response({"status": "ready"})
        return json_response({"status": "stopping" if service.stopping else "starting"}, 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/queues", guarded(None, list_queues), methods=["GET"]),
        Route("/v1/queues/{name}", guarded(None, get_queue), methods=["GET"]),
        Route("/v1/queues/{name}", guarded(Scope.ADMIN, put_queue), methods=["PUT"]),
        Route("/v1/queues/{name}", guarded(Scope.ADMIN, delete_queue), methods=["DELETE"]),
        Route("/v1/queues/{name}/messages", guarded(Scope.PUBLISH, publish), methods=["POST"]),
        Route("/v1/queues/{name}/leases", guarded(Scope.CONSUME, lease), methods=["POST"]),
        Route("/v1/queues/{name}/acks", guarded(Scope.CONSUME, ack), methods=["POST"]),
        Route("/v1/queues/{name}/nacks", guarded(Scope.CONSUME, nack), methods=["POST"]),
        Route("/v1/queues/{name}/extend", guarded(Scope.CONSUME, extend), methods=["POST"]),
        Route("/v1/queues/{name}/redrive", guarded(Scope.ADMIN, redrive), methods=["POST"]),
    ]
    if push is not None:
        routes.extend(subscription_routes(push, guarded))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_service:
            service.open()
            await service.start()
            if push is not None:
                push.start()
        elif not service.ready:
            await service.start()
        try:
            yield
        finally:
            if manage_service:
                if push is not None:
                    await push.close()
                await service.close()

    return Starlette(routes=routes, lifespan=lifespan)
