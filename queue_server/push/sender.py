"""One delivery attempt: build the signed JSON batch, connect to the pinned address, classify the response.

The request body is::

    {"queue": "telemetry", "subscription": "collectors",
     "messages": [{"id": "12-0", "deliveries": 1, "published_at": "...Z", "body": {...}}]}

The connection goes to the address ``EndpointGuard.pin`` checked: the URL
carries that address, the ``Host`` header the endpoint's host name and, for
https, the TLS server name (SNI, also used to verify the certificate) is the
host name too. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from queue_server.push.backoff import Outcome, classify_status, parse_retry_after
from queue_server.push.guard import EndpointGuard, EndpointRejected, ResolutionFailed
from queue_server.push.subscription import Subscription
from telemetry.http_responses import release_stream
from telemetry.webhooks import HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, signature_header

logger = logging.getLogger(__name__)

USER_AGENT = "telemetry-queue-push/1"


@dataclass(frozen=True, slots=True)
class PushMessage:
    """A leased message on its way to an endpoint."""

    id: str
    receipt: str
    deliveries: int
    published_at: str
    body: Any


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """Result of one attempt; ``detail`` is a short description for logs and stats."""

    outcome: Outcome
    status: int | None = None
    retry_after_s: float | None = None
    detail: str = ""


def webhook_id(messages: Sequence[PushMessage]) -> str:
    """Return an id derived from the message ids, so a retried batch keeps its ``webhook-id``."""
    digest = hashlib.blake2b(",".join(m.id for m in messages).encode(), digest_size=12).hexdigest()
    return f"msg_{digest}"


def encode_batch(subscription: Subscription, messages: Sequence[PushMessage]) -> bytes:
    return orjson.dumps(
        {
            "queue": subscription.queue,
            "subscription": subscription.name,
            "messages": [
                {"id": m.id, "deliveries": m.deliveries, "published_at": m.published_at, "body": m.body}
                for m in messages
            ],
        }
    )


class WebhookSender:
    """Sends batches to subscription endpoints through one httpx client.

    ``transport`` replaces the network (tests pass ``respx`` or an ASGI transport);
    ``clock`` returns seconds since the Unix epoch for the signature timestamp.
    """

    def __init__(
        self,
        *,
        guard: EndpointGuard,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.guard = guard
        self.clock = clock
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            headers={"user-agent": USER_AGENT},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, subscription: Subscription, messages: Sequence[PushMessage]) -> AttemptResult:
        """Make one attempt; never raises for network or HTTP failures, which become outcomes."""
        config = subscription.config
        try:
            pinned = await self.guard.pin(config.endpoint)
        except (EndpointRejected, ResolutionFailed) as exc:
            return AttemptResult(Outcome.ADDRESS_REJECTED, detail=str(exc))

        body = encode_batch(subscription, messages)
        now = self.clock()
        timestamp = int(now)
        delivery_id = webhook_id(messages)
        headers = {
            "host": pinned.host_header,
            "content-type": "application/json",
            HEADER_ID: delivery_id,
            HEADER_TIMESTAMP: str(timestamp),
            HEADER_SIGNATURE: signature_header(subscription.signing_secrets(now), delivery_id, timestamp, body),
        }
        # NOTE: tests check that https requests carry this server name; none runs
        # a TLS handshake with a pinned address.
        extensions = {"sni_hostname": pinned.host} if pinned.scheme == "https" else {}
        request = self._client.build_request(
            "POST",
            pinned.connect_url,
            content=body,
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s),
            extensions=extensions,
        )
        try:
            # httpx applies the timeout per phase; this bounds the whole exchange.
            async with asyncio.timeout(config.timeout_s):
                # The response body is not read: only the status and headers count.
                response = await self._client.send(request, stream=True)
                await response.aclose()
                release_stream(response)
        except (TimeoutError, httpx.TimeoutException):
            return AttemptResult(Outcome.TIMEOUT, detail=f"no answer within {config.timeout_s:g} s")
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            return AttemptResult(Outcome.CONNECTION_ERROR, detail=f"{type(exc).__name__}: {exc}"[:200])

        outcome = classify_status(response.status_code)
        retry_after = parse_retry_after(response.headers.get("retry-after"), now)
        return AttemptResult(outcome, response.status_code, retry_after, f"HTTP {response.status_code}")
