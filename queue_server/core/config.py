"""Queue configuration: defaults, limits and validation of ``PUT /v1/queues/{name}`` bodies."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from queue_server.errors import InvalidRequest

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
DEFAULT_VISIBILITY_TIMEOUT_S = 30.0
MAX_VISIBILITY_TIMEOUT_S = 43_200.0
DEFAULT_MAX_DELIVERIES = 5
#: Messages older than this are dropped unless the queue sets its own retention_s.
DEFAULT_RETENTION_S = 7 * 24 * 3600
DEAD_LETTER_SUFFIX = ".dlq"


def check_queue_name(name: str) -> str:
    """Return ``name`` if it is a valid queue name; raise ``InvalidRequest`` otherwise."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(
            f"queue name {name!r} is invalid: expected 1 to 128 characters from "
            "A-Z, a-z, 0-9, '.', '_' and '-'"
        )
    return name


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Settings of one queue; ``None`` limits mean unlimited.

    ``dead_letter_queue=None`` turns dead-lettering off, and then a message is
    redelivered however often its leases expire.
    """

    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    retention_s: float = DEFAULT_RETENTION_S
    max_messages: int | None = None
    max_bytes: int | None = None
    dead_letter_queue: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, fields: dict[str, Any]) -> "QueueConfig":
        """Return a copy with ``fields`` (a request body) applied, after validating each one."""
        unknown = sorted(set(fields) - set(_VALIDATORS))
        if unknown:
            raise InvalidRequest(
                f"unknown queue field {unknown[0]!r}: expected some of {sorted(_VALIDATORS)}"
            )
        changes: dict[str, Any] = {key: _VALIDATORS[key](key, value) for key, value in fields.items()}
        return replace(self, **changes)

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> "QueueConfig":
        """Rebuild a config stored by ``to_json``."""
        return cls().updated(fields)


def _number(key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidRequest(f"{key}={value!r} is invalid: expected a number from {low:g} to {high:g}")
    return float(value)


def _integer(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{key}={value!r} is invalid: expected an integer from {low} to {high}")
    return value


def _visibility(key: str, value: Any) -> float:
    return _number(key, value, 0.001, MAX_VISIBILITY_TIMEOUT_S)


def _max_deliveries(key: str, value: Any) -> int:
    return _integer(key, value, 1, 1000)


def _retention(key: str, value: Any) -> float:
    return _number(key, value, 1, 366 * 24 * 3600)


def _optional_limit(key: str, value: Any) -> int | None:
    if value is None:
        return None
    return _integer(key, value, 1, 2**62)


def _dead_letter_queue(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{key}={value!r} is invalid: expected a queue name or null")
    return check_queue_name(value)


_VALIDATORS = {
    "visibility_timeout_s": _visibility,
    "max_deliveries": _max_deliveries,
    "retention_s": _retention,
    "max_messages": _optional_limit,
    "max_bytes": _optional_limit,
    "dead_letter_queue": _dead_letter_queue,
}
