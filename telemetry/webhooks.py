"""Standard Webhooks signatures: the queue signs push deliveries, the collector verifies them.

A signed request carries three headers:

- ``webhook-id``: an identifier of the delivery;
- ``webhook-timestamp``: the signing time in whole seconds since the Unix epoch;
- ``webhook-signature``: one or more space-separated ``v1,<base64>`` entries, each an
  HMAC-SHA256 over ``"{id}.{timestamp}.{body}"``.

A secret is ``whsec_`` followed by the base64 encoding of the HMAC key. While a secret
is being rotated the sender signs with the old and the new one, so a receiver that
has either of them accepts the request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as random_source
from collections.abc import Mapping, Sequence

__all__ = [
    "SECRET_PREFIX",
    "DEFAULT_TOLERANCE_S",
    "HEADER_ID",
    "HEADER_TIMESTAMP",
    "HEADER_SIGNATURE",
    "WebhookError",
    "InvalidSecret",
    "InvalidSignature",
    "generate_secret",
    "secret_key",
    "sign",
    "signature_header",
    "verify",
]

SECRET_PREFIX = "whsec_"

#: How far a request's timestamp may be from the receiver's clock, in seconds.
DEFAULT_TOLERANCE_S = 300

#: Key sizes accepted in a secret, in bytes; generated secrets have 32.
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"


class WebhookError(Exception):
    """Root of this module's errors."""


class InvalidSecret(WebhookError, ValueError):
    """A secret that is not ``whsec_`` followed by a base64 key of 24 to 64 bytes."""


class InvalidSignature(WebhookError):
    """A request whose headers are missing, too old or too new, or signed with another key.

    ``reason`` is a short label fit for a metric: ``missing_header``,
    ``invalid_timestamp``, ``timestamp_out_of_tolerance`` or ``no_matching_signature``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def generate_secret() -> str:
    """Return a new random secret with a 32-byte key."""
    return SECRET_PREFIX + base64.b64encode(random_source.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """Return the HMAC key of ``secret``; raise ``InvalidSecret`` when it is malformed."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecret(
            f"webhook secret starting {secret[:6]!r} is invalid: expected 'whsec_' followed by base64"
        )
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise InvalidSecret("webhook secret is invalid: the part after 'whsec_' is not base64") from exc
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise InvalidSecret(
            f"webhook secret has a {len(key)}-byte key: expected {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes"
        )
    return key


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``v1,<base64>`` signature of one request under one secret."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets: Sequence[str], webhook_id: str, timestamp: int, body: bytes) -> str:
    """Return the ``webhook-signature`` value: one signature per secret, space-separated."""
    if not secrets:
        raise InvalidSecret("cannot sign a webhook request without a secret")
    return " ".join(sign(secret, webhook_id, timestamp, body) for secret in secrets)


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> str:
    """Check a request's signature against any of ``secrets``; return its ``webhook-id``.

    ``headers`` must be case-insensitive (Starlette and httpx headers are) or
    use lower-case names. ``now`` is the receiver's clock in seconds since the
    Unix epoch. Raises ``InvalidSignature``.
    """
    webhook_id = headers.get(HEADER_ID)
    timestamp_text = headers.get(HEADER_TIMESTAMP)
    signatures = headers.get(HEADER_SIGNATURE)
    if not webhook_id or not timestamp_text or not signatures:
        raise InvalidSignature(
            "missing_header",
            f"request lacks one of the headers {HEADER_ID}, {HEADER_TIMESTAMP}, {HEADER_SIGNATURE}",
        )
    try:
        timestamp = int(timestamp_text)
    except ValueError as exc:
        raise InvalidSignature(
            "invalid_timestamp", f"{HEADER_TIMESTAMP}={timestamp_text[:40]!r} is not an integer"
        ) from exc
    if abs(now - timestamp) > tolerance_s:
        raise InvalidSignature(
            "timestamp_out_of_tolerance",
            f"{HEADER_TIMESTAMP}={timestamp} is more than {tolerance_s:g} s away from the "
            f"receiver's clock ({int(now)}); check both clocks",
        )

    offered = [entry.partition(",")[2] for entry in signatures.split() if entry.startswith("v1,")]
    for secret in secrets:
        expected = sign(secret, webhook_id, timestamp, body).partition(",")[2]
        if any(hmac.compare_digest(expected, candidate) for candidate in offered):
            return webhook_id
    raise InvalidSignature(
        "no_matching_signature",
        f"no v1 signature of webhook {webhook_id[:80]!r} matches a configured secret",
    )
