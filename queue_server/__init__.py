"""Durable HTTP message queue of the GPU telemetry pipeline (``telemetry-queue``)."""
