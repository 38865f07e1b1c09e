"""Delivery decisions without I/O: classifying responses, backoff, and the concurrency limit."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import Enum

from queue_server.push.subscription import RetrySettings

#: The longest Retry-After the dispatcher honours, in seconds; longer values are capped to it.
MAX_RETRY_AFTER_S = 3600.0


class Outcome(str, Enum):
    """Result of one delivery attempt; the values are metric labels."""

    DELIVERED = "delivered"
    #: 410 Gone: the receiver requests that the subscription stop.
    GONE = "gone"
    #: 429 or 5xx: the receiver is overloaded or failing.
    RETRYABLE_STATUS = "retryable_status"
    #: Any other status outside 2xx (other 4xx, 3xx since redirects are not followed).
    REJECTED_STATUS = "rejected_status"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    #: The endpoint's address failed the SSRF check or its name did not resolve.
    ADDRESS_REJECTED = "address_rejected"

    @property
    def failed(self) -> bool:
        return self not in (Outcome.DELIVERED, Outcome.GONE)


def classify_status(status: int) -> Outcome:
    """Map an HTTP status to an outcome: 2xx acknowledges the batch, 410 disables, the rest fail."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status == 410:
        return Outcome.GONE
    if status == 429 or status >= 500:
        return Outcome.RETRYABLE_STATUS
    return Outcome.REJECTED_STATUS


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Return the wait a ``Retry-After`` header requests, in seconds, or ``None`` when absent or invalid.

    Both forms are read: delta-seconds and an HTTP date. The result is at most
    ``MAX_RETRY_AFTER_S``.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if moment is None or moment.tzinfo is None:
            return None
        seconds = moment.timestamp() - now
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def backoff_delay(
    retry: RetrySettings,
    consecutive_failures: int,
    retry_after_s: float | None,
    *,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Return the wait before the next attempt, in seconds: full jitter, at least Retry-After.

    The ceiling doubles from ``initial_backoff_s`` with each consecutive failure
    (1-based) up to ``max_backoff_s``, and the wait is drawn uniformly below it.
    """
    exponent = min(max(consecutive_failures, 1) - 1, 60)
    ceiling = min(retry.max_backoff_s, retry.initial_backoff_s * 2.0**exponent)
    delay = uniform(0.0, ceiling)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


@dataclass(slots=True)
class ConcurrencyLimit:
    """Additive-increase, multiplicative-decrease limit on deliveries in flight.

    It starts at 1, grows by one per successful delivery up to ``maximum`` and is
    halved (down to 1) by each failed one, so a struggling receiver gets fewer
    requests at once.
    """

    maximum: int
    current: int = 1

    def on_success(self) -> None:
        self.current = min(self.maximum, self.current + 1)

    def on_failure(self) -> None:
        self.current = max(1, self.current // 2)

    def resize(self, maximum: int) -> None:
        self.maximum = maximum
        self.current = min(self.current, maximum)
