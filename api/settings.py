"""Settings of the API server, read once from ``API_*`` variables and ``DATABASE_URL``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from telemetry.database import database_url_from_env
from telemetry.settings import SettingsError, env_int, env_str

__all__ = ["ApiSettings"]

_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


@dataclass(frozen=True)
class ApiSettings:
    """Configuration of one API server.

    ``token`` empty means the read API is open. ``threads`` is the number of
    request threads per worker process and also the size of each worker's
    PostgreSQL connection pool, so no request waits for a connection.
    """

    database_url: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int = 4
    token: str = ""
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65_535:
            raise SettingsError(
                f"API_PORT={self.port!r} is invalid: expected a port from 0 to 65535"
            )
        if self.workers < 1:
            raise SettingsError(
                f"API_WORKERS={self.workers!r} is invalid: expected an integer of at least 1"
            )
        if self.threads < 1:
            raise SettingsError(
                f"API_THREADS={self.threads!r} is invalid: expected an integer of at least 1"
            )
        if self.log_level.upper() not in _LOG_LEVELS:
            raise SettingsError(
                f"API_LOG_LEVEL={self.log_level!r} is invalid: expected one of {', '.join(_LOG_LEVELS)}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiSettings:
        """Read ``DATABASE_URL`` and the ``API_*`` variables; errors name the variable."""
        return cls(
            database_url=database_url_from_env(dict(environ) if environ is not None else None),
            host=env_str("API_HOST", cls.host, environ),
            port=env_int("API_PORT", cls.port, environ),
            workers=env_int("API_WORKERS", cls.workers, environ),
            threads=env_int("API_THREADS", cls.threads, environ),
            token=env_str("API_TOKEN", cls.token, environ),
            log_level=env_str("API_LOG_LEVEL", cls.log_level, environ).upper(),
        )
