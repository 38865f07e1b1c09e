"""Errors of the queue server, rooted at ``QueueServerError``.

The HTTP layer maps every subclass with a ``status`` to a problem+json response.
The branches follow what the caller can do: fix the request (4xx), retry later
(``QueueFull``, ``DiskFull``, ``ShuttingDown``), or stop the server (``StorageError``).
"""

from __future__ import annotations


class QueueServerError(Exception):
    """Root of the queue server's errors."""

    status = 500
    title = "Internal error"


class InvalidRequest(QueueServerError):
    """A request field has a missing, malformed or out-of-range value."""

    status = 400
    title = "Invalid request"


class Unauthorized(QueueServerError):
    """No bearer token, or a token the server does not know."""

    status = 401
    title = "Unauthorized"


class Forbidden(QueueServerError):
    """A valid token that lacks the scope the request needs."""

    status = 403
    title = "Forbidden"


class QueueNotFound(QueueServerError):
    """The named queue does not exist."""

    status = 404
    title = "Queue not found"


class PayloadTooLarge(QueueServerError):
    """The request body is larger than the server accepts."""

    status = 413
    title = "Payload too large"


class RetryLater(QueueServerError):
    """A temporary condition; ``retry_after_s`` is sent as the Retry-After header."""

    retry_after_s = 1

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(RetryLater):
    """Publishing would take a queue past its max_messages or max_bytes."""

    status = 429
    title = "Queue full"


class DiskFull(RetryLater):
    """The data directory's file system is nearly full."""

    status = 507
    title = "Insufficient storage"


class ShuttingDown(RetryLater):
    """The server is stopping and accepts no new work."""

    status = 503
    title = "Shutting down"


class IllegalTransition(QueueServerError):
    """A message state change that the lease state machine does not allow."""


class StorageError(QueueServerError):
    """The write-ahead log cannot be read or written; the server must stop."""


class CorruptLog(StorageError):
    """A record in the middle of the write-ahead log fails its checksum or framing."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(
            f"write-ahead log {path!r} is corrupt at byte offset {offset}: {reason}; "
            "restore the data directory from a backup, or move this file and every later "
            "segment away to start from the records before it"
        )
        self.path = path
        self.offset = offset


class DataDirLocked(StorageError):
    """Another process holds the data directory's lock."""
