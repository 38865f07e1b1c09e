"""The push subscriptions of one server, keyed by (queue, subscription name).

Changes are planned here without I/O. The caller logs the returned
subscription as a ``SUBSCRIPTION_PUT`` record (or the key as
``SUBSCRIPTION_DELETE``), and replay at start applies the same records through
``apply_put`` and ``apply_delete``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from queue_server.errors import InvalidRequest, QueueServerError
from queue_server.push.subscription import (
    PUT_FIELDS,
    Subscription,
    SubscriptionState,
    check_subscription_name,
    new_secret,
    parse_config,
    secret_overlap,
)


class SubscriptionNotFound(QueueServerError):
    """The named subscription does not exist."""

    status = 404
    title = "Subscription not found"


@dataclass(frozen=True, slots=True)
class PlannedPut:
    """A validated PUT: the subscription to store, whether it is new, and a secret to show once."""

    subscription: Subscription
    created: bool
    new_secret: str | None


class SubscriptionRegistry:
    def __init__(self) -> None:
        self._subscriptions: dict[tuple[str, str], Subscription] = {}

    def get(self, queue: str, name: str) -> Subscription:
        subscription = self._subscriptions.get((queue, name))
        if subscription is None:
            raise SubscriptionNotFound(
                f"subscription {name!r} of queue {queue!r} does not exist: create it with "
                f"PUT /v1/queues/{queue}/subscriptions/{name}"
            )
        return subscription

    def find(self, queue: str, name: str) -> Subscription | None:
        return self._subscriptions.get((queue, name))

    def of_queue(self, queue: str) -> list[Subscription]:
        return [s for (q, _), s in sorted(self._subscriptions.items()) if q == queue]

    def all(self) -> list[Subscription]:
        return list(self._subscriptions.values())

    def plan_put(self, queue: str, name: str, fields: dict[str, Any], now: float) -> PlannedPut:
        """Validate a PUT body against the current subscription; change nothing.

        A PUT enables a disabled subscription again. A ``secret`` that differs from
        the current one starts a rotation: the old secret keeps signing for
        ``secret_overlap_s`` seconds. Raises ``InvalidRequest``.
        """
        check_subscription_name(name)
        unknown = sorted(set(fields) - PUT_FIELDS)
        if unknown:
            raise InvalidRequest(
                f"unknown subscription field {unknown[0]!r}: expected some of {sorted(PUT_FIELDS)}"
            )
        settings = {key: value for key, value in fields.items() if key not in ("secret", "secret_overlap_s")}
        overlap = secret_overlap(fields)
        current = self._subscriptions.get((queue, name))

        if current is None:
            secret = new_secret(fields)
            subscription = Subscription(
                queue=queue,
                name=name,
                config=parse_config(settings, None),
                secrets=(),
                created_at=now,
            ).with_secret(secret, now, 0)
            # The secret is shown once, unless the request supplied it.
            shown = None if fields.get("secret") is not None else secret
            return PlannedPut(subscription, True, shown)

        subscription = replace(
            current,
            config=parse_config(settings, current.config),
            state=SubscriptionState.ACTIVE,
            disabled_reason=None,
        )
        if fields.get("secret") is not None:
            subscription = subscription.with_secret(new_secret(fields), now, overlap)
        return PlannedPut(subscription, False, None)

    def plan_rotation(
        self, queue: str, name: str, fields: dict[str, Any], now: float
    ) -> tuple[Subscription, str]:
        """Return the subscription with a new secret (given or generated) and that secret."""
        unknown = sorted(set(fields) - {"secret", "secret_overlap_s"})
        if unknown:
            raise InvalidRequest(
                f"unknown field {unknown[0]!r} in secret rotation: expected some of "
                "['secret', 'secret_overlap_s']"
            )
        current = self.get(queue, name)
        secret = new_secret(fields)
        return current.with_secret(secret, now, secret_overlap(fields)), secret

    # Applying logged changes, live and at replay

    def apply_put(self, subscription: Subscription) -> None:
        self._subscriptions[subscription.key] = subscription

    def apply_delete(self, queue: str, name: str) -> None:
        self._subscriptions.pop((queue, name), None)

    def drop_queue(self, queue: str) -> list[Subscription]:
        """Forget the subscriptions of a deleted queue; return them."""
        dropped = [s for s in self._subscriptions.values() if s.queue == queue]
        for subscription in dropped:
            del self._subscriptions[subscription.key]
        return dropped

    # Checkpoints

    def checkpoint(self) -> list[dict[str, Any]]:
        return [subscription.to_record() for subscription in self._subscriptions.values()]

    def restore(self, records: Iterable[dict[str, Any]]) -> None:
        self._subscriptions.clear()
        for record in records:
            self.apply_put(Subscription.from_record(record))
