"""Async client of the queue service, on httpx.

    async with QueueClient(["http://127.0.0.1:8500"]) as queue:
        await queue.create_queue("telemetry")
        await queue.publish("telemetry", [OutgoingMessage(body={...}, key="a:1")])
        for message in await queue.lease("telemetry", max_messages=100, wait_s=20):
            ...
        await queue.ack("telemetry", [message.receipt])

Connection errors, 429 and 5xx responses are retried with exponential backoff and
full jitter, honouring ``Retry-After`` (seconds or an HTTP date). A publish is
retried with the same body, so messages that carry an idempotency ``key`` are stored once however often the
request is repeated. Long-polls run on their own connection pool, so waiting
leases never hold up publishes and acks.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import logging
import random
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

import httpx
import msgspec
import orjson

from telemetry.http_responses import release_stream

__all__ = [
    "QueueClient",
    "RetryPolicy",
    "OutgoingMessage",
    "PublishResult",
    "LeasedMessage",
    "ReceiptResult",
    "QueueError",
    "QueueUnavailable",
    "QueueRequestError",
    "QueueNotFound",
    "decode_json",
]

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 507})

#: Extra read time a long-poll gets beyond its ``wait_s``, in seconds.
LONG_POLL_MARGIN_S = 10.0

#: Receipts the queue server takes in one ack, nack or extend request. Longer
#: lists are sent in requests of this many, one after the other.
MAX_RECEIPTS_PER_REQUEST = 10_000


class QueueError(Exception):
    """Root of the queue client's errors."""


class QueueUnavailable(QueueError):
    """The queue could not be reached or kept responding with 429/5xx until retries ran out.

    The caller may try again later. ``status`` is the last HTTP status, or ``None``
    for a transport failure.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class QueueRequestError(QueueError):
    """The queue rejected the request (a 4xx other than 429): fix the call, do not retry."""

    def __init__(self, message: str, *, status: int, problem: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.problem = dict(problem or {})


class QueueNotFound(QueueRequestError):
    """The named queue does not exist (404)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the client retries retryable failures.

    ``max_attempts=None`` retries until ``max_elapsed_s`` passes, or forever when
    that is ``None`` too. Backoff doubles from ``initial_backoff_s`` up to
    ``max_backoff_s`` (seconds), with full jitter.
    """

    max_attempts: int | None = 8
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 10.0
    max_elapsed_s: float | None = None

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Return the sleep before retry number ``attempt`` (1-based), in seconds."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * (2 ** (attempt - 1)))
        delay = random.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message to publish. ``body`` is any JSON value; ``key`` makes the publish idempotent."""

    body: Any
    key: str | None = None
    delay_s: float = 0

    def to_json(self) -> dict[str, Any]:
        item: dict[str, Any] = {"body": self.body}
        if self.key is not None:
            item["key"] = self.key
        if self.delay_s:
            item["delay_s"] = self.delay_s
        return item


# The per-message structs below come by the thousand per request, and a collector
# keeps thousands at a time. With gc=False the cyclic garbage collector neither
# counts nor walks them. Decoded JSON cannot form reference cycles.


class PublishResult(msgspec.Struct, frozen=True, gc=False):
    """Outcome of one published message: its id, and whether its key was already stored."""

    id: str
    duplicate: bool


class _PublishResponse(msgspec.Struct):
    results: list[PublishResult]


BodyT = TypeVar("BodyT")


class LeasedMessage(msgspec.Struct, Generic[BodyT], frozen=True, gc=False):
    """A message handed out under a lease. ``receipt`` acks, nacks or extends this delivery only."""

    id: str
    receipt: str
    body: BodyT
    deliveries: int
    published_at: str


class _LeaseResponse(msgspec.Struct, Generic[BodyT]):
    messages: list[LeasedMessage[BodyT]]


class ReceiptResult(msgspec.Struct, frozen=True, gc=False):
    """Outcome of an ack, nack or extend for one receipt.

    ``receipt`` is the receipt as sent. ``status`` is ``acked``, ``nacked``,
    ``dead_lettered`` or ``extended`` on success; ``stale`` when the message was
    leased again since this receipt was issued; ``not_found`` when the message is
    gone (already acked, dead-lettered or deleted); ``invalid`` for a receipt the
    server cannot parse.
    """

    receipt: Any
    status: str

    @property
    def ok(self) -> bool:
        return self.status in ("acked", "nacked", "dead_lettered", "extended")


class _ReceiptsResponse(msgspec.Struct):
    results: list[ReceiptResult]


@dataclass
class _Node:
    url: str
    client: httpx.AsyncClient
    poll_client: httpx.AsyncClient
    failures: int = field(default=0)


class QueueClient:
    """Client of one or more queue nodes; each queue name maps to one node by hash.

    All options are keyword-only. ``transport`` replaces the network (tests pass an
    ``httpx.ASGITransport`` or a respx mock). ``http2=True`` speaks cleartext HTTP/2
    with prior knowledge to ``http://`` nodes and negotiates it by ALPN on ``https://``;
    long-poll leases always use HTTP/1.1 connections of their own.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        http2: bool = True,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 20,
    ) -> None:
        if isinstance(urls, str):
            urls = [u.strip() for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("QueueClient needs at least one queue URL, got none")
        self.retry = retry or RetryPolicy()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._nodes = [
            _Node(
                url=url.rstrip("/"),
                client=self._make_client(
                    url, headers, http2, timeout_s, transport, max_connections
                ),
                # Long-polls use HTTP/1.1 with one connection each. Cancelling one closes
                # its connection, so the server stops waiting for it. A cancelled HTTP/2
                # request leaves its stream open on the server, which would then lease
                # messages to a consumer that is gone.
                poll_client=self._make_client(
                    url, headers, False, timeout_s + LONG_POLL_MARGIN_S, transport, max_connections
                ),
            )
            for url in urls
        ]
        self._closed = False

    @staticmethod
    def _make_client(
        url: str,
        headers: dict[str, str],
        http2: bool,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None,
        max_connections: int,
    ) -> httpx.AsyncClient:
        tls = url.startswith("https://")
        return httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers=headers,
            http1=tls or not http2,
            http2=http2,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections),
        )

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self._nodes]

    async def __aenter__(self) -> "QueueClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for node in self._nodes:
            try:
                await node.client.aclose()
            finally:
                await node.poll_client.aclose()

    # Queue administration

    async def create_queue(self, name: str, **config: Any) -> dict[str, Any]:
        """Create or update queue ``name`` (idempotent) and return its configuration."""
        return await self._call(name, "PUT", f"/v1/queues/{name}", config)

    async def get_queue(self, name: str) -> dict[str, Any]:
        """Return the configuration and stats of queue ``name``."""
        return await self._call(name, "GET", f"/v1/queues/{name}", None)

    async def list_queues(self) -> list[dict[str, Any]]:
        """Return every queue of every node."""
        queues: list[dict[str, Any]] = []
        for node in self._nodes:
            answer = await self._send(node, node.client, "GET", "/v1/queues", None, name=None)
            queues.extend(answer["queues"])
        return queues

    async def delete_queue(self, name: str) -> None:
        await self._call(name, "DELETE", f"/v1/queues/{name}", None)

    # Push subscriptions

    async def put_subscription(self, queue: str, name: str, **fields: Any) -> dict[str, Any]:
        """Create or update push subscription ``name`` of ``queue`` and return it.

        The response to a create carries the generated ``secret``, once.
        """
        return await self._call(queue, "PUT", f"/v1/queues/{queue}/subscriptions/{name}", fields)

    async def rotate_subscription_secret(self, queue: str, name: str, **fields: Any) -> dict[str, Any]:
        """Give push subscription ``name`` a new signing secret; the answer carries it as ``secret``."""
        path = f"/v1/queues/{queue}/subscriptions/{name}/rotate-secret"
        return await self._call(queue, "POST", path, fields)

    # Messages

    async def publish(
        self, queue: str, messages: Iterable[OutgoingMessage | Mapping[str, Any]]
    ) -> list[PublishResult]:
        """Publish up to 1000 messages; return once they are durable, one result each.

        A message given as a mapping is sent as it is, in the JSON form of
        ``OutgoingMessage`` (``body``, optional ``key`` and ``delay_s``).
        """
        # A plain dict is encoded without a copy: the request body is encoded
        # before this coroutine first waits, so later changes to it cannot leak in.
        items: list[Any] = []
        for message in messages:
            if type(message) is dict:
                items.append(message)
            elif isinstance(message, OutgoingMessage):
                items.append(message.to_json())
            else:
                items.append(dict(message))
        answer: _PublishResponse = await self._call(
            queue,
            "POST",
            f"/v1/queues/{queue}/messages",
            {"messages": items},
            decode=_struct_decoder(_PublishResponse),
        )
        return answer.results

    async def lease(
        self,
        queue: str,
        *,
        max_messages: int = 1000,
        wait_s: float = 20,
        visibility_timeout_s: float | None = None,
        body_type: Any = None,
    ) -> list[LeasedMessage[Any]]:
        """Long-poll for up to ``max_messages``; an empty list when ``wait_s`` passes first.

        Bodies are plain JSON values (dicts, lists, strings, numbers). With
        ``body_type``, a type that msgspec decodes such as a ``msgspec.Struct``, each
        body that is valid for it is decoded into it instead, in the same pass as
        the rest of the response. A body that is not valid for it stays a plain
        JSON value, so the caller can find out why.
        """
        payload: dict[str, Any] = {"max_messages": max_messages, "wait_s": wait_s}
        if visibility_timeout_s is not None:
            payload["visibility_timeout_s"] = visibility_timeout_s
        decode = _decode_lease if body_type is None else _typed_lease_decoder(body_type)
        messages: list[LeasedMessage[Any]] = await self._call(
            queue,
            "POST",
            f"/v1/queues/{queue}/leases",
            payload,
            long_poll=True,
            wait_s=wait_s,
            decode=decode,
        )
        return messages

    async def ack(self, queue: str, receipts: Sequence[str]) -> list[ReceiptResult]:
        """Acknowledge deliveries; an acked message is never delivered again.

        Like ``nack`` and ``extend``, a list longer than ``MAX_RECEIPTS_PER_REQUEST``
        goes in several requests, and an empty list in none.
        """
        return await self._receipts(queue, "acks", {"receipts": list(receipts)})

    async def nack(
        self,
        queue: str,
        receipts: Sequence[str],
        *,
        delay_s: float = 0,
        dead_letter: bool = False,
        reason: str | None = None,
    ) -> list[ReceiptResult]:
        """Return deliveries to the queue after ``delay_s``, or to the dead-letter queue."""
        payload: dict[str, Any] = {"receipts": list(receipts), "delay_s": delay_s}
        if dead_letter:
            payload["dead_letter"] = True
        if reason is not None:
            payload["reason"] = reason
        return await self._receipts(queue, "nacks", payload)

    async def extend(
        self, queue: str, receipts: Sequence[str], *, visibility_timeout_s: float
    ) -> list[ReceiptResult]:
        """Push the leases' expiry to ``visibility_timeout_s`` seconds from now."""
        payload = {"receipts": list(receipts), "visibility_timeout_s": visibility_timeout_s}
        return await self._receipts(queue, "extend", payload)

    async def redrive(self, dead_letter_queue: str, *, max_messages: int | None = None) -> int:
        """Move messages of a dead-letter queue back to their source queues; return how many."""
        payload = {} if max_messages is None else {"max_messages": max_messages}
        answer = await self._call(
            dead_letter_queue, "POST", f"/v1/queues/{dead_letter_queue}/redrive", payload
        )
        return int(answer["redriven"])

    async def _receipts(self, queue: str, verb: str, payload: dict[str, Any]) -> list[ReceiptResult]:
        receipts: list[str] = payload["receipts"]
        results: list[ReceiptResult] = []
        for start in range(0, len(receipts), MAX_RECEIPTS_PER_REQUEST):
            chunk = {**payload, "receipts": receipts[start : start + MAX_RECEIPTS_PER_REQUEST]}
            answer: _ReceiptsResponse = await self._call(
                queue, "POST", f"/v1/queues/{queue}/{verb}", chunk, decode=_struct_decoder(_ReceiptsResponse)
            )
            results.extend(answer.results)
        return results

    # Transport

    def _node_for(self, queue: str) -> _Node:
        if len(self._nodes) == 1:
            return self._nodes[0]
        return self._nodes[zlib.crc32(queue.encode()) % len(self._nodes)]

    async def _call(
        self,
        queue: str,
        method: str,
        path: str,
        payload: Any,
        *,
        long_poll: bool = False,
        wait_s: float = 0.0,
        decode: _Decoder | None = None,
    ) -> Any:
        node = self._node_for(queue)
        client = node.poll_client if long_poll else node.client
        read_timeout = None
        if long_poll:
            # The read must outlast the server-side wait, whatever timeout_s is.
            configured = client.timeout.read or 0.0
            read_timeout = max(configured, wait_s + LONG_POLL_MARGIN_S)
        return await self._send(
            node,
            client,
            method,
            path,
            payload,
            name=queue,
            read_timeout=read_timeout,
            decode=decode,
        )

    async def _send(
        self,
        node: _Node,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        payload: Any,
        *,
        name: str | None,
        read_timeout: float | None = None,
        decode: _Decoder | None = None,
    ) -> Any:
        """Send a request, retrying retryable failures, and return the decoded response body.

        ``decode`` turns a successful response into the return value; the default
        decodes any JSON.
        """
        if self._closed:
            raise RuntimeError("QueueClient is closed")
        content = orjson.dumps(payload) if payload is not None else None
        headers = {"content-type": "application/json"} if content is not None else None
        timeout = client.timeout
        if read_timeout is not None:
            timeout = httpx.Timeout(
                timeout.connect, read=read_timeout, write=timeout.write, pool=timeout.pool
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                response = await client.request(
                    method, path, content=content, headers=headers, timeout=timeout
                )
                # The body is read and the response closed.
                release_stream(response)
            except httpx.TransportError as exc:
                status: int | None = None
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    if node.failures:
                        logger.info(
                            "queue %s reachable again after %d failed attempts",
                            node.url,
                            node.failures,
                        )
                        node.failures = 0
                    return (decode or _decode_success)(method, node.url, path, response)
                status = response.status_code
                if status not in RETRYABLE_STATUS:
                    raise _request_error(method, path, response, name)
                failure = f"HTTP {status}: {_problem_detail(response)}"
                retry_after = _retry_after(response)

            node.failures += 1
            elapsed = loop.time() - started
            if not self._may_retry(attempt, elapsed):
                raise QueueUnavailable(
                    f"{method} {node.url}{path} failed after {attempt} attempts "
                    f"in {elapsed:.1f} s: {failure}",
                    status=status,
                )
            delay = self.retry.backoff(attempt, retry_after)
            level = logging.WARNING if attempt == 1 else logging.DEBUG
            logger.log(
                level,
                "%s %s%s failed (%s), retry %d in %.2f s",
                method,
                node.url,
                path,
                failure,
                attempt,
                delay,
            )
            await asyncio.sleep(delay)

    def _may_retry(self, attempt: int, elapsed: float) -> bool:
        if self.retry.max_attempts is not None and attempt >= self.retry.max_attempts:
            return False
        if self.retry.max_elapsed_s is not None and elapsed >= self.retry.max_elapsed_s:
            return False
        return True


def _problem_detail(response: httpx.Response) -> str:
    try:
        problem = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text[:200] or response.reason_phrase
    if isinstance(problem, dict) and "detail" in problem:
        return str(problem["detail"])
    return response.text[:200]


def decode_json(data: bytes) -> Any:
    """Decode JSON text that the queue server delivers, such as a lease response.

    The server stores any JSON text as a message body, including numbers too
    large for a double, which orjson rejects. They become ``inf`` or ``-inf``
    here, so one such body does not make a whole lease unreadable. Raises
    ``msgspec.DecodeError`` for text that is not JSON.
    """
    return _JSON_DECODER.decode(data)


_JSON_DECODER = msgspec.json.Decoder(float_hook=float)


def _decode_success(method: str, url: str, path: str, response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return decode_json(response.content)
    except msgspec.DecodeError as exc:
        raise QueueError(
            f"{method} {url}{path} returned HTTP {response.status_code} with a body that is not "
            f"JSON ({response.text[:80]!r}); check that the URL points at a queue server"
        ) from exc


#: A function that turns a successful response into a return value, called with
#: (method, node URL, path, response).
_Decoder = Callable[[str, str, str, httpx.Response], Any]


def _decode_lease(method: str, url: str, path: str, response: httpx.Response) -> list[LeasedMessage[Any]]:
    answer = _decode_success(method, url, path, response)
    return [
        LeasedMessage(
            id=m["id"],
            receipt=m["receipt"],
            body=m["body"],
            deliveries=m["deliveries"],
            published_at=m["published_at"],
        )
        for m in answer["messages"]
    ]


@functools.cache
def _struct_decoder(response_type: type[msgspec.Struct]) -> _Decoder:
    """Return a decoder of responses of one fixed shape, straight into ``response_type``."""
    decoder = msgspec.json.Decoder(response_type)

    def decode(method: str, url: str, path: str, response: httpx.Response) -> Any:
        try:
            return decoder.decode(response.content)
        except msgspec.DecodeError as exc:
            if not isinstance(exc, msgspec.ValidationError):
                # Raises the usual QueueError for a body that is not JSON.
                _decode_success(method, url, path, response)
            raise QueueError(
                f"{method} {url}{path} returned HTTP {response.status_code} with an unexpected "
                f"response body ({exc}); check that the URL points at a queue server"
            ) from exc

    return decode


@functools.cache
def _typed_lease_decoder(body_type: Any) -> _Decoder:
    response_decoder = msgspec.json.Decoder(_LeaseResponse[body_type])  # type: ignore[valid-type]
    body_decoder = msgspec.json.Decoder(body_type)

    def typed_body(message: LeasedMessage[Any]) -> LeasedMessage[Any]:
        try:
            body = body_decoder.decode(orjson.dumps(message.body))
        except msgspec.ValidationError:
            return message
        return msgspec.structs.replace(message, body=body)

    def decode(method: str, url: str, path: str, response: httpx.Response) -> list[LeasedMessage[Any]]:
        try:
            return response_decoder.decode(response.content).messages
        except msgspec.DecodeError:
            # A body is not valid for body_type (msgspec.ValidationError), or the
            # response is not JSON, which the plain decoder reports as a QueueError.
            # The response is decoded as plain JSON, then each body on its own.
            pass
        return [typed_body(message) for message in _decode_lease(method, url, path, response)]

    return decode


def _retry_after(response: httpx.Response) -> float | None:
    """Return the Retry-After delay in seconds, from delta-seconds or an HTTP date."""
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (moment - datetime.now(timezone.utc)).total_seconds())


def _request_error(
    method: str, path: str, response: httpx.Response, name: str | None
) -> QueueRequestError:
    try:
        problem = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    detail = problem.get("detail") or response.text[:200] or response.reason_phrase
    message = f"{method} {path} rejected with HTTP {response.status_code}: {detail}"
    if response.status_code == 404:
        return QueueNotFound(message, status=404, problem=problem)
    return QueueRequestError(message, status=response.status_code, problem=problem)
