"""Errors as RFC 9457 problem details (``application/problem+json``).

Every error response of the API is built by ``problem_response``. That covers
HTTP errors raised by views and Werkzeug, invalid query parameters, database
outages (503 with Retry-After) and unexpected exceptions. A 500 response
contains no exception text, because the traceback goes to the log only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
from apiflask import APIFlask, HTTPError
from flask import Response, request
from sqlalchemy import exc as sa_exc
from werkzeug.datastructures import Headers

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "RETRY_AFTER_S",
    "log_database_error",
    "problem_response",
    "register_error_handlers",
]

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"

#: Retry-After value, in seconds, of the 503 sent while the database is unreachable.
RETRY_AFTER_S = 5

#: Errors that mean the database could not be reached or used right now. SQLite
#: also raises OperationalError for a missing table, and PostgreSQL's missing
#: table is mapped the same way below: the schema is not there yet.
_UNAVAILABLE_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


def problem_response(
    status: int, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    """Build a problem details response for ``status`` with the given ``detail``."""
    body = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    response = Response(orjson.dumps(body), status=status, content_type=PROBLEM_CONTENT_TYPE)
    for name, value in (headers or {}).items():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def register_error_handlers(app: APIFlask) -> None:
    """Route every error of ``app`` to a problem details response."""
    app.before_request(_reject_nul_characters)
    app.error_processor(_http_error)
    for error_class in _UNAVAILABLE_ERRORS:
        app.register_error_handler(error_class, _database_unavailable)
    app.register_error_handler(sa_exc.ProgrammingError, _programming_error)
    app.register_error_handler(Exception, _unexpected_error)


def _reject_nul_characters() -> Response | None:
    # PostgreSQL text cannot contain NUL, so such a value would fail in the
    # driver with a DataError instead of being rejected as invalid input.
    if "\x00" in request.path:
        return problem_response(400, f"path {request.path!r} contains a NUL character: remove it")
    for name, value in request.args.items(multi=True):
        if "\x00" in name or "\x00" in value:
            return problem_response(
                400, f"query parameter {name}={value!r} contains a NUL character: remove it"
            )
    return None


def _http_error(error: HTTPError) -> Response:
    detail = error.detail
    if not detail:
        detail = _default_detail(error.status_code)
    elif isinstance(detail, Mapping):
        detail = _describe_validation_error(detail)
    headers = {name: str(value) for name, value in Headers(error.headers).items()}
    return problem_response(error.status_code, str(detail), headers)


def _default_detail(status: int) -> str:
    if status == 404:
        return f"no resource at {request.path!r}: see /docs for the API's routes"
    if status == 405:
        return f"method {request.method} is not allowed on {request.path!r}"
    if status == 401:
        return "missing or invalid bearer token: send 'Authorization: Bearer <token>'"
    return HTTPStatus(status).description


def _describe_validation_error(messages: Mapping[str, Any]) -> str:
    """Turn webargs' ``{location: {field: [message, ...]}}`` into one sentence per field."""
    sentences = []
    for location, fields in messages.items():
        if not isinstance(fields, Mapping):
            sentences.append(f"{location}: {_flatten(fields)}")
            continue
        for name, field_messages in fields.items():
            text = _flatten(field_messages)
            if name == "_schema":
                sentences.append(text)
            elif location != "query":
                sentences.append(f"{location} field {name!r} is invalid: {text}")
            elif text == "Unknown field.":
                sentences.append(
                    f"unknown query parameter {name!r}: remove it (see /docs for the parameters)"
                )
            else:
                sentences.append(f"query parameter {_show_values(name)} is invalid: {text}")
    return "; ".join(sentences)


def _show_values(name: str) -> str:
    values = request.args.getlist(name)
    if not values:
        return name
    if len(values) == 1:
        return f"{name}={values[0]!r}"
    return f"{name}={values!r}"


def _flatten(messages: Any) -> str:
    if isinstance(messages, Mapping):
        return " ".join(_flatten(value) for value in messages.values())
    if isinstance(messages, (list, tuple)):
        return " ".join(_flatten(value) for value in messages)
    return str(messages)


class _RateLimitedLog:
    """Log a repeated warning at most once per ``interval_s``, with the count of those skipped."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._skipped = 0

    def warning(self, message: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                self._skipped += 1
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        suffix = f" ({skipped} similar errors since the last report)" if skipped else ""
        logger.warning(message + suffix, *args)


_database_error_log = _RateLimitedLog(interval_s=30.0)


def log_database_error(message: str, *args: Any) -> None:
    """Log a database error as a warning, at most once per 30 s with a count of the rest."""
    _database_error_log.warning(message, *args)


def _database_unavailable(error: sa_exc.SQLAlchemyError) -> Response:
    cause = getattr(error, "orig", None) or error
    log_database_error("database unavailable during %s %s: %s", request.method, request.path, cause)
    return problem_response(
        503,
        f"the database is unavailable ({type(cause).__name__}): retry after {RETRY_AFTER_S} seconds",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


#: PostgreSQL's SQLSTATE for "undefined_table": the schema has not been migrated yet.
_UNDEFINED_TABLE = "42P01"


def _programming_error(error: sa_exc.ProgrammingError) -> Response:
    if getattr(error.orig, "sqlstate", None) == _UNDEFINED_TABLE:
        return _database_unavailable(error)
    return _unexpected_error(error)


def _unexpected_error(error: Exception) -> Response:
    logger.exception("unexpected error during %s %s", request.method, request.path)
    return problem_response(500, "internal server error: the server logged the details")
