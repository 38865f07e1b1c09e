"""Typed reads of environment variables, for the components' entry points.

Each component reads its settings once, at start, with its own prefix
(``QUEUE_``, ``STREAMER_``, ``COLLECTOR_``, ``API_``); errors name the variable
and its value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

__all__ = ["SettingsError", "InvalidConfig", "env_str", "env_int", "env_float", "env_bool", "env_list"]

T = TypeVar("T")


class SettingsError(ValueError):
    """An environment variable contains a value that cannot be used."""


class InvalidConfig(ValueError):
    """A component option with a value out of its range.

    ``field`` is the option's attribute name in the component's config class (or
    on its parsed command line, for options only the command line has), so the
    command line can name the environment variable and flag that set it.
    """

    def __init__(self, field: str, value: object, expected: str) -> None:
        super().__init__(f"{field}={value!r} is invalid: expected {expected}")
        self.field = field
        self.value = value
        self.expected = expected

    def describe(self, sources: Mapping[str, tuple[str, str]]) -> str:
        """Return the message with the environment variable and flag that ``sources`` gives for the field."""
        if self.field not in sources:
            return str(self)
        variable, flag = sources[self.field]
        return f"{variable} / {flag} = {self.value!r} is invalid: expected {self.expected}"


def _read(
    name: str, default: T, cast: Callable[[str], T], expected: str, environ: Mapping[str, str] | None
) -> T:
    environ = os.environ if environ is None else environ
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return cast(raw.strip())
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is invalid: expected {expected}") from exc


def env_str(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    return _read(name, default, str, "a string", environ)


def env_int(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    return _read(name, default, int, "an integer", environ)


def env_float(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    return _read(name, default, float, "a number", environ)


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    return _read(name, default, _parse_bool, "one of true/false/1/0/yes/no/on/off", environ)


def env_list(name: str, default: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """Read a comma-separated list; empty items are dropped."""

    def split(raw: str) -> list[str]:
        return [item.strip() for item in raw.split(",") if item.strip()]

    return _read(name, default, split, "a comma-separated list", environ)
