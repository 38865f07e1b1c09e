"""Optional bearer-token authentication of the read API.

When the application's ``API_TOKEN`` setting is empty every request passes;
otherwise a request needs ``Authorization: Bearer <API_TOKEN>``. Health,
readiness, metrics and the API documentation stay open, so probes and scrapers
need no token.
"""

from __future__ import annotations

import hmac
from typing import Any

from apiflask import HTTPTokenAuth
from flask import current_app

__all__ = ["token_auth"]


class _OptionalTokenAuth(HTTPTokenAuth):
    """Bearer authentication that is switched off while no token is configured."""

    def authenticate(self, auth: Any, stored_password: Any) -> bool:
        # Flask-HTTPAuth skips verification when the request has no token; here
        # a missing token must pass while none is configured.
        expected: str = current_app.config.get("API_TOKEN") or ""
        if not expected:
            return True
        token: str = getattr(auth, "token", None) or ""
        # compare_digest takes time independent of where the strings differ.
        return hmac.compare_digest(token.encode(), expected.encode())


token_auth = _OptionalTokenAuth(
    scheme="Bearer",
    description="Required only when the server runs with API_TOKEN set.",
)
