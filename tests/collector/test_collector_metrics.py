"""The collector's metrics: known label values are exported from the start."""

from __future__ import annotations

from prometheus_client import generate_latest

from collector.metrics import REJECTION_REASONS, CollectorMetrics
from collector.worker import REJECTED_BY_DATABASE


def test_known_series_start_at_zero() -> None:
    text = generate_latest(CollectorMetrics().registry).decode()

    for reason in REJECTION_REASONS:
        assert f'telemetry_collector_messages_rejected_total{{reason="{reason}"}} 0.0' in text
    assert 'telemetry_collector_receipts_lost_total{verb="extend"} 0.0' in text
    assert 'telemetry_collector_queue_errors_total{verb="lease"} 0.0' in text


def test_rejection_reasons_cover_database_refusal() -> None:
    assert REJECTED_BY_DATABASE in REJECTION_REASONS
