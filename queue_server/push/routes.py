"""HTTP routes of push subscriptions, mounted by ``queue_server.http.app``.

``guard`` is the application's wrapper that checks the bearer token's scope
and maps ``QueueServerError`` to problem+json, so these handlers only parse
and call ``PushService``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from queue_server.auth import Scope
from queue_server.http.requests import MAX_OTHER_BYTES, read_json, require_object
from queue_server.push.service import PushService

Handler = Callable[[Request], Awaitable[Response]]
Guard = Callable[[Scope | None, Handler], Handler]

SUBSCRIPTIONS = "/v1/queues/{name}/subscriptions"
SUBSCRIPTION = "/v1/queues/{name}/subscriptions/{subscription}"


def _json(data: Any, status: int = 200) -> Response:
    # Descriptions that carry a secret must not be kept by caches.
    return Response(
        orjson.dumps(data), status_code=status, media_type="application/json", headers={"cache-control": "no-store"}
    )


def subscription_routes(push: PushService, guard: Guard) -> list[Route]:
    async def list_subscriptions(request: Request) -> Response:
        return _json({"subscriptions": push.list(request.path_params["name"])})

    async def get_subscription(request: Request) -> Response:
        return _json(push.get(request.path_params["name"], request.path_params["subscription"]))

    async def put_subscription(request: Request) -> Response:
        queue = request.path_params["name"]
        push.service.queue(queue)
        fields = require_object(await read_json(request, MAX_OTHER_BYTES), "subscription")
        description, created = await push.put(queue, request.path_params["subscription"], fields)
        return _json(description, 201 if created else 200)

    async def delete_subscription(request: Request) -> Response:
        await push.delete(request.path_params["name"], request.path_params["subscription"])
        return Response(status_code=204)

    async def rotate_secret(request: Request) -> Response:
        queue = request.path_params["name"]
        push.service.queue(queue)
        fields = require_object(await read_json(request, MAX_OTHER_BYTES), "secret rotation")
        return _json(await push.rotate_secret(queue, request.path_params["subscription"], fields))

    return [
        Route(SUBSCRIPTIONS, guard(None, list_subscriptions), methods=["GET"]),
        Route(SUBSCRIPTION, guard(None, get_subscription), methods=["GET"]),
        Route(SUBSCRIPTION, guard(Scope.ADMIN, put_subscription), methods=["PUT"]),
        Route(SUBSCRIPTION, guard(Scope.ADMIN, delete_subscription), methods=["DELETE"]),
        Route(f"{SUBSCRIPTION}/rotate-secret", guard(Scope.ADMIN, rotate_secret), methods=["POST"]),
    ]
