"""Reading and validating request bodies; every error names the bad value."""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.requests import Request

from queue_server.errors import InvalidRequest, PayloadTooLarge

MAX_PUBLISH_BYTES = 4 * 1024 * 1024
MAX_OTHER_BYTES = 1024 * 1024
MAX_KEY_LENGTH = 256
MAX_REASON_LENGTH = 1024
MAX_WAIT_S = 20.0


async def read_json(request: Request, limit: int) -> Any:
    """Read and decode the body; ``PayloadTooLarge`` past ``limit`` bytes, ``InvalidRequest`` for bad JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {limit} bytes: send smaller batches")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes: send smaller batches")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        return {}
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from exc


def require_object(data: Any, description: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidRequest(f"{description} must be a JSON object, got {type(data).__name__} {_short(data)}")
    return data


def reject_unknown(data: dict[str, Any], allowed: set[str], description: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r} in {description}: expected some of {sorted(allowed)}")


def number_field(data: dict[str, Any], key: str, default: float | None, low: float, high: float) -> float | None:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(f"{key}={_short(value)} is invalid: expected a number from {low:g} to {high:g}")
    return float(value)


def integer_field(data: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int | None:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{key}={_short(value)} is invalid: expected an integer from {low} to {high}")
    return value


def receipts_field(data: dict[str, Any]) -> list[Any]:
    receipts = data.get("receipts")
    if not isinstance(receipts, list) or not 1 <= len(receipts) <= 1000:
        raise InvalidRequest(
            f"receipts={_short(receipts)} is invalid: expected a list of 1 to 1000 receipt strings"
        )
    return receipts


def parse_publish(data: Any, max_messages: int) -> tuple[list[bytes], list[str | None], list[float]]:
    """Validate a publish body; return each message's encoded body, key and delay."""
    data = require_object(data, "publish request")
    reject_unknown(data, {"messages"}, "publish request")
    messages = data.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= max_messages:
        raise InvalidRequest(
            f"messages={_short(messages)} is invalid: expected a list of 1 to {max_messages} messages"
        )
    bodies: list[bytes] = []
    keys: list[str | None] = []
    delays: list[float] = []
    dumps = orjson.dumps
    for position, message in enumerate(messages):
        # Fast path for the common shapes {"body"} and {"body", "key"}; anything else is checked in full.
        if type(message) is dict and "body" in message:
            size = len(message)
            key = message.get("key")
            if size == 1 or (size == 2 and type(key) is str and 1 <= len(key) <= MAX_KEY_LENGTH):
                bodies.append(dumps(message["body"]))
                keys.append(key)
                delays.append(0.0)
                continue

        field = f"messages[{position}]"
        message = require_object(message, field)
        reject_unknown(message, {"body", "key", "delay_s"}, field)
        if "body" not in message:
            raise InvalidRequest(f"{field} has no 'body': every message needs a JSON body")
        key = message.get("key")
        if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH):
            raise InvalidRequest(
                f"{field}.key={_short(key)} is invalid: expected a string of 1 to {MAX_KEY_LENGTH} characters"
            )
        delay = number_field(message, "delay_s", 0.0, 0, 43_200)
        bodies.append(orjson.dumps(message["body"]))
        keys.append(key)
        delays.append(delay or 0.0)
    return bodies, keys, delays


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
