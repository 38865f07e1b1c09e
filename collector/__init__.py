"""The telemetry collector: leases records from the queue and stores them in the database."""
