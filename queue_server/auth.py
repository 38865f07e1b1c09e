"""Bearer tokens with scopes: publish, consume and admin."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from queue_server.errors import Forbidden, Unauthorized


class Scope(str, Enum):
    PUBLISH = "publish"
    CONSUME = "consume"
    ADMIN = "admin"


class TokenFormatError(ValueError):
    """A token specification that cannot be parsed; the message names the entry."""


@dataclass(frozen=True, slots=True)
class Tokens:
    """Known tokens and their scopes; no tokens means open access."""

    scopes_by_token: dict[str, frozenset[Scope]]

    @property
    def open(self) -> bool:
        return not self.scopes_by_token

    def check(self, authorization: str | None, scope: Scope | None) -> None:
        """Raise ``Unauthorized`` or ``Forbidden`` unless the header grants ``scope``.

        ``scope=None`` accepts any valid token.
        """
        if self.open:
            return
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
        presented = authorization[7:].strip()
        granted = self._scopes_of(presented)
        if granted is None:
            raise Unauthorized("the bearer token is not valid: check the token the server was given")
        if scope is not None and scope not in granted:
            raise Forbidden(
                f"the bearer token lacks scope {scope.value!r} (it has "
                f"{sorted(s.value for s in granted)}): use a token with that scope"
            )

    def _scopes_of(self, presented: str) -> frozenset[Scope] | None:
        found = None
        for token, scopes in self.scopes_by_token.items():
            # Compare every token in constant time so timing does not reveal a prefix.
            if hmac.compare_digest(token.encode(), presented.encode()):
                found = scopes
        return found


def parse_tokens(text: str, *, source: str) -> Tokens:
    """Parse ``SCOPES:TOKEN`` entries separated by ``;`` or newlines (scopes comma-separated)."""
    scopes_by_token: dict[str, frozenset[Scope]] = {}
    entries = [entry.strip() for entry in text.replace("\n", ";").split(";")]
    for number, entry in enumerate(entries, start=1):
        if not entry or entry.startswith("#"):
            continue
        scopes_text, separator, token = entry.partition(":")
        if not separator or not token.strip():
            raise TokenFormatError(
                f"{source} entry {number} is invalid: expected SCOPES:TOKEN, e.g. 'publish,consume:s3cret'"
            )
        try:
            scopes = frozenset(Scope(s.strip()) for s in scopes_text.split(",") if s.strip())
        except ValueError as exc:
            raise TokenFormatError(
                f"{source} entry {number} has an unknown scope in {scopes_text!r}: "
                "expected publish, consume or admin"
            ) from exc
        if not scopes:
            raise TokenFormatError(f"{source} entry {number} names no scope: expected publish, consume or admin")
        scopes_by_token[token.strip()] = scopes
    return Tokens(scopes_by_token)


def load_tokens(inline: str | None, file: Path | None) -> Tokens:
    """Combine ``QUEUE_TOKENS`` and the entries of ``QUEUE_TOKENS_FILE``."""
    combined: dict[str, frozenset[Scope]] = {}
    if inline:
        combined.update(parse_tokens(inline, source="QUEUE_TOKENS").scopes_by_token)
    if file is not None:
        combined.update(parse_tokens(file.read_text(), source=f"QUEUE_TOKENS_FILE {str(file)!r}").scopes_by_token)
    return Tokens(combined)
