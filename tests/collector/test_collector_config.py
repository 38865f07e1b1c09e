"""Collector options and the rate-limited rejection log, without a queue or database."""

from __future__ import annotations

import logging

import pytest

from collector.worker import CollectorConfig, _RejectionLog


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 1001}, "batch_size=1001"),
        ({"wait_s": 21}, "wait_s=21"),
        ({"visibility_timeout_s": 0.5}, "visibility_timeout_s=0.5"),
        ({"concurrent_leases": 0}, "concurrent_leases=0"),
    ],
    ids=["batch-zero", "batch-too-large", "wait-too-long", "visibility-too-short", "no-leases"],
)
def test_config_rejects_out_of_range(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CollectorConfig(**options)  # type: ignore[arg-type]


def test_rejection_log_once_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    log = _RejectionLog(interval_s=3600)

    with caplog.at_level(logging.WARNING, logger="collector.worker"):
        for number in range(5):
            log.record("invalid_json", f"m{number}", "message body is not JSON")
        log.record("missing_field", "m9", "uuid: Field required")

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "m0" in messages[0]
    assert "invalid_json" in messages[0]
    assert "missing_field" in messages[1]


def test_rejection_log_reports_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    log = _RejectionLog(interval_s=0.0)
    log._last_logged["invalid_json"] = float("-inf")
    log._suppressed["invalid_json"] = 41

    with caplog.at_level(logging.WARNING, logger="collector.worker"):
        log.record("invalid_json", "m42", "message body is not JSON")

    assert "41 more with this reason" in caplog.records[0].getMessage()
