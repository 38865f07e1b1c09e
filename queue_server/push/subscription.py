"""One push subscription: its settings, signing secrets and state, and their validation.

Nothing here does I/O. Times are seconds since the Unix epoch, passed in by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from queue_server.core.config import NAME_PATTERN
from queue_server.errors import InvalidRequest
from telemetry.webhooks import InvalidSecret, generate_secret, secret_key

MAX_BATCH_SIZE = 1000
MAX_CONCURRENCY = 64
MAX_TIMEOUT_S = 300.0
MAX_BACKOFF_S = 43_200.0
MAX_ENDPOINT_LENGTH = 2048
#: How long the previous secret keeps signing after a rotation, unless the request sets ``secret_overlap_s``.
DEFAULT_SECRET_OVERLAP_S = 3600.0
MAX_SECRET_OVERLAP_S = 7 * 24 * 3600.0


class SubscriptionState(str, Enum):
    ACTIVE = "active"
    #: Deliveries stopped because the endpoint responded with 410 Gone; a PUT enables it again.
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Backoff between failed deliveries: doubles from ``initial_backoff_s`` up to ``max_backoff_s``."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0

    def to_json(self) -> dict[str, float]:
        return {"initial_backoff_s": self.initial_backoff_s, "max_backoff_s": self.max_backoff_s}


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    """Settings an operator chooses with ``PUT .../subscriptions/{name}``."""

    endpoint: str
    batch_size: int = 100
    max_concurrency: int = 4
    timeout_s: float = 30.0
    retry: RetrySettings = field(default_factory=RetrySettings)

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "batch_size": self.batch_size,
            "max_concurrency": self.max_concurrency,
            "timeout_s": self.timeout_s,
            "retry": self.retry.to_json(),
        }


@dataclass(frozen=True, slots=True)
class SigningSecret:
    """A secret that signs deliveries until ``expires_at`` (``None``: until it is rotated)."""

    value: str
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Subscription:
    """A push subscription as stored in the write-ahead log.

    ``secrets`` lists the newest secret first; older ones carry the end of
    their overlap period.
    """

    queue: str
    name: str
    config: SubscriptionConfig
    secrets: tuple[SigningSecret, ...]
    state: SubscriptionState = SubscriptionState.ACTIVE
    disabled_reason: str | None = None
    created_at: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return self.queue, self.name

    def signing_secrets(self, now: float) -> list[str]:
        """Return the secrets that sign a delivery made at ``now``, newest first."""
        return [s.value for s in self.secrets if s.expires_at is None or s.expires_at > now]

    def with_secret(self, secret: str, now: float, overlap_s: float) -> "Subscription":
        """Return a copy signed by ``secret``; the current secrets keep signing for ``overlap_s``."""
        if self.secrets and self.secrets[0].value == secret:
            return self
        ends = now + overlap_s
        kept = [
            SigningSecret(old.value, ends if old.expires_at is None else min(old.expires_at, ends))
            for old in self.secrets
            if overlap_s > 0 and (old.expires_at is None or old.expires_at > now)
        ]
        return replace(self, secrets=(SigningSecret(secret), *kept))

    def disabled(self, reason: str) -> "Subscription":
        return replace(self, state=SubscriptionState.DISABLED, disabled_reason=reason)

    def to_record(self) -> dict[str, Any]:
        """Return everything needed to rebuild the subscription, secrets included."""
        return {
            "queue": self.queue,
            "name": self.name,
            "config": self.config.to_json(),
            "secrets": [[s.value, s.expires_at] for s in self.secrets],
            "state": self.state.value,
            "disabled_reason": self.disabled_reason,
            "created_at": self.created_at,
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> "Subscription":
        config = parse_config(data["config"], None)
        return cls(
            queue=data["queue"],
            name=data["name"],
            config=config,
            secrets=tuple(SigningSecret(value, expires) for value, expires in data["secrets"]),
            state=SubscriptionState(data["state"]),
            disabled_reason=data.get("disabled_reason"),
            created_at=float(data.get("created_at", 0.0)),
        )

    def to_public(self, now: float) -> dict[str, Any]:
        """Return the subscription as the API shows it: no secret values."""
        previous = [s.expires_at for s in self.secrets[1:] if s.expires_at is not None and s.expires_at > now]
        return {
            "queue": self.queue,
            "name": self.name,
            **self.config.to_json(),
            "state": self.state.value,
            "disabled_reason": self.disabled_reason,
            "previous_secret_expires_at": max(previous) if previous else None,
        }


def check_subscription_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequest(
            f"subscription name {name!r} is invalid: expected 1 to 128 characters from "
            "A-Z, a-z, 0-9, '.', '_' and '-'"
        )
    return name


#: Fields of a PUT body that are settings; ``secret`` and ``secret_overlap_s`` are handled apart.
CONFIG_FIELDS = frozenset({"endpoint", "batch_size", "max_concurrency", "timeout_s", "retry"})
PUT_FIELDS = CONFIG_FIELDS | {"secret", "secret_overlap_s"}


def parse_config(fields: dict[str, Any], current: SubscriptionConfig | None) -> SubscriptionConfig:
    """Return ``current`` with ``fields`` applied, each one validated; ``endpoint`` is required on create."""
    unknown = sorted(set(fields) - CONFIG_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown subscription field {unknown[0]!r}: expected some of {sorted(PUT_FIELDS)}")
    if current is None and "endpoint" not in fields:
        raise InvalidRequest("a new subscription needs 'endpoint': the http:// or https:// URL to POST batches to")

    endpoint = check_endpoint(fields["endpoint"]) if "endpoint" in fields else current.endpoint  # type: ignore[union-attr]
    base = current or SubscriptionConfig(endpoint=endpoint)
    retry = _parse_retry(fields["retry"], base.retry) if "retry" in fields else base.retry
    return SubscriptionConfig(
        endpoint=endpoint,
        batch_size=_integer(fields, "batch_size", base.batch_size, 1, MAX_BATCH_SIZE),
        max_concurrency=_integer(fields, "max_concurrency", base.max_concurrency, 1, MAX_CONCURRENCY),
        timeout_s=_number(fields, "timeout_s", base.timeout_s, 0.1, MAX_TIMEOUT_S),
        retry=retry,
    )


def check_endpoint(value: Any) -> str:
    """Return ``value`` if it is an absolute http(s) URL without credentials or fragment."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ENDPOINT_LENGTH:
        raise InvalidRequest(
            f"endpoint={_short(value)} is invalid: expected an http:// or https:// URL of at most "
            f"{MAX_ENDPOINT_LENGTH} characters"
        )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise InvalidRequest(f"endpoint={_short(value)} is invalid: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"endpoint={_short(value)} is invalid: expected an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(
            f"endpoint={_short(value)} is invalid: credentials in the URL are not supported; "
            "receivers authenticate deliveries by their signature"
        )
    if parts.fragment:
        raise InvalidRequest(f"endpoint={_short(value)} is invalid: remove the '#' fragment")
    if port == 0:
        raise InvalidRequest(f"endpoint={_short(value)} is invalid: port 0 cannot be connected to")
    return value


def check_secret(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"secret={_short(value)} is invalid: expected a 'whsec_<base64>' string")
    try:
        secret_key(value)
    except InvalidSecret as exc:
        raise InvalidRequest(f"{exc}; omit 'secret' to have the server generate one") from exc
    return value


def new_secret(fields: dict[str, Any]) -> str:
    """Return the secret a request names, or a new random one."""
    return check_secret(fields["secret"]) if fields.get("secret") is not None else generate_secret()


def secret_overlap(fields: dict[str, Any]) -> float:
    return _number(fields, "secret_overlap_s", DEFAULT_SECRET_OVERLAP_S, 0, MAX_SECRET_OVERLAP_S)


def _parse_retry(value: Any, current: RetrySettings) -> RetrySettings:
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"retry={_short(value)} is invalid: expected an object with initial_backoff_s and max_backoff_s"
        )
    unknown = sorted(set(value) - {"initial_backoff_s", "max_backoff_s"})
    if unknown:
        raise InvalidRequest(
            f"unknown retry field {unknown[0]!r}: expected some of ['initial_backoff_s', 'max_backoff_s']"
        )
    initial = _number(value, "initial_backoff_s", current.initial_backoff_s, 0.01, MAX_BACKOFF_S)
    maximum = _number(value, "max_backoff_s", max(current.max_backoff_s, initial), 0.01, MAX_BACKOFF_S)
    if maximum < initial:
        raise InvalidRequest(
            f"retry.max_backoff_s={maximum!r} is invalid: expected at least initial_backoff_s={initial!r}"
        )
    return RetrySettings(initial, maximum)


def _number(fields: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = fields.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise InvalidRequest(f"{key}={_short(value)} is invalid: expected a number from {low:g} to {high:g}")
    return float(value)


def _integer(fields: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = fields.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{key}={_short(value)} is invalid: expected an integer from {low} to {high}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
