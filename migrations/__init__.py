"""Alembic migrations of the telemetry database (see ``alembic.ini``)."""
