"""Pieces that several components import: the telemetry record, the database
tables, the queue client and settings parsing."""
