"""Opaque page cursors for keyset pagination over telemetry samples.

A cursor records the sort key ``(timestamp, id)`` of the last sample on a page
and a fingerprint of the query that produced it. The next page continues
strictly after that key, so no sample is returned twice, and a cursor presented
with other filters is rejected instead of silently paging a different result.
The encoding is base64url JSON without padding; it is not signed, because a
forged cursor can only move the position inside the caller's own query.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeGuard

import orjson

__all__ = ["Cursor", "InvalidCursor", "query_fingerprint"]

_VERSION = 1
_MAX_CURSOR_LENGTH = 512
#: Largest id a BIGINT column holds; a larger one would fail in the database driver.
_MAX_SAMPLE_ID = 2**63 - 1


class InvalidCursor(ValueError):
    """A cursor that cannot be decoded or belongs to another query."""


@dataclass(frozen=True)
class Cursor:
    """Position after which the next page starts, for the query with ``fingerprint``."""

    timestamp: datetime
    sample_id: int
    fingerprint: str

    def encode(self) -> str:
        """Return the opaque, URL-safe string form."""
        payload = {
            "v": _VERSION,
            "t": _epoch_microseconds(self.timestamp),
            "i": self.sample_id,
            "q": self.fingerprint,
        }
        return base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, text: str, *, fingerprint: str) -> Cursor:
        """Decode a cursor and check that it was issued for the query ``fingerprint``.

        Raises ``InvalidCursor`` naming what is wrong.
        """
        if len(text) > _MAX_CURSOR_LENGTH:
            raise InvalidCursor(
                f"cursor is {len(text)} characters long, longer than any issued cursor"
            )
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            payload = orjson.loads(raw)
        except (binascii.Error, ValueError) as exc:
            raise InvalidCursor(f"cursor {text!r} is not a cursor returned by this API") from exc

        if not isinstance(payload, dict) or payload.get("v") != _VERSION:
            raise InvalidCursor(f"cursor {text!r} is not a cursor returned by this API")
        micros, sample_id, cursor_fingerprint = payload.get("t"), payload.get("i"), payload.get("q")
        if not (_is_int(micros) and _is_int(sample_id) and isinstance(cursor_fingerprint, str)):
            raise InvalidCursor(f"cursor {text!r} is not a cursor returned by this API")
        if not 0 <= sample_id <= _MAX_SAMPLE_ID:
            raise InvalidCursor(f"cursor {text!r} contains an out-of-range sample id")
        if cursor_fingerprint != fingerprint:
            raise InvalidCursor(
                f"cursor {text!r} was issued for a different query: repeat the first page's "
                "GPU, start_time, end_time and metric_name parameters, or drop the cursor"
            )

        try:
            timestamp = _EPOCH + timedelta(microseconds=micros)
        except OverflowError as exc:
            raise InvalidCursor(f"cursor {text!r} contains an out-of-range time") from exc
        return cls(timestamp=timestamp, sample_id=sample_id, fingerprint=fingerprint)


def query_fingerprint(
    gpu_id: str,
    start_time: datetime | None,
    end_time: datetime | None,
    metric_names: Iterable[str],
) -> str:
    """Return a short digest of the filters that define one paged result."""
    parts = [
        gpu_id,
        "" if start_time is None else str(_epoch_microseconds(start_time)),
        "" if end_time is None else str(_epoch_microseconds(end_time)),
        *sorted(set(metric_names)),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_microseconds(moment: datetime) -> int:
    delta = moment.astimezone(UTC) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
