"""Read-only REST API gateway over the telemetry database (APIFlask, served by granian)."""
