"""Access to the application's database engine from views."""

from __future__ import annotations

from flask import current_app
from sqlalchemy.engine import Engine

__all__ = ["ENGINE_EXTENSION", "get_engine"]

#: Key of the engine in ``app.extensions``.
ENGINE_EXTENSION = "telemetry_engine"


def get_engine() -> Engine:
    """Return the engine of the current application."""
    engine: Engine = current_app.extensions[ENGINE_EXTENSION]
    return engine
