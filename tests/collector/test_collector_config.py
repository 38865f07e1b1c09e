"""Collector options and the rate-limited rejection log, without a queue or database."""

from __future__ import annotations

import logging
import os

import pytest

from collector.__main__ import main
from telemetry.webhooks import generate_secret
from collector.worker import CollectorConfig, _RejectionLog


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 1001}, "batch_size=1001"),
        ({"wait_s": 21}, "wait_s=21"),
        ({"visibility_timeout_s": 0.5}, "visibility_timeout_s=0.5"),
        ({"concurrent_leases": 0}, "concurrent_leases=0"),
        ({"stop_timeout_s": -1}, "stop_timeout_s=-1"),
    ],
    ids=["batch-zero", "batch-too-large", "wait-too-long", "visibility-too-short", "no-leases", "negative-stop"],
)
def test_config_rejects_out_of_range(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CollectorConfig(**options)  # type: ignore[arg-type]


# Each validated option of the command line: the variable, its flag, an invalid value
# and the range the message states.
INVALID_OPTIONS = [
    ("COLLECTOR_BATCH_SIZE", "--batch-size", "0", "= 0 is invalid: expected 1 to 1000"),
    ("COLLECTOR_BATCH_SIZE", "--batch-size", "1001", "= 1001 is invalid: expected 1 to 1000"),
    ("COLLECTOR_MAX_TRANSACTION_ROWS", "--max-transaction-rows", "0", "= 0 is invalid: expected 1 or more"),
    ("COLLECTOR_MAX_MERGE_WAIT_S", "--max-merge-wait-s", "11", "= 11.0 is invalid: expected 0 to 10 seconds"),
    ("COLLECTOR_WAIT_S", "--wait-s", "-1", "= -1.0 is invalid: expected 0 to 20 seconds"),
    ("COLLECTOR_VISIBILITY_TIMEOUT_S", "--visibility-timeout-s", "0.5", "= 0.5 is invalid: expected 1 to 43200"),
    ("COLLECTOR_STOP_TIMEOUT_S", "--stop-timeout-s", "-5", "= -5.0 is invalid: expected 0 or more seconds"),
    ("COLLECTOR_PORT", "--port", "70000", "= 70000 is invalid: expected 0 to 65535"),
    ("COLLECTOR_LOG_LEVEL", "--log-level", "loud", "= 'LOUD' is invalid: expected one of DEBUG"),
    ("COLLECTOR_MODE", "--mode", "pushy", "= 'pushy' is invalid: expected one of pull, push"),
    ("COLLECTOR_QUEUE_URLS", "--queue-urls", ",", "= ',' is invalid: expected one or more"),
    ("COLLECTOR_PUSH_MAX_CONCURRENCY", "--push-max-concurrency", "65", "= 65 is invalid: expected 1 to 64"),
    ("COLLECTOR_PUSH_TIMEOUT_S", "--push-timeout-s", "0", "= 0.0 is invalid: expected 0.1 to 300 seconds"),
]


@pytest.fixture
def push_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear the COLLECTOR_ variables; set a webhook secret, which the push-mode options need."""
    for name in list(os.environ):
        if name.startswith("COLLECTOR_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLLECTOR_WEBHOOK_SECRET", generate_secret())


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    """Run the collector's entry point; return its exit status and standard error."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.usefixtures("push_environment")
@pytest.mark.parametrize(("variable", "flag", "value", "message"), INVALID_OPTIONS)
def test_cli_invalid_variable_named(
    variable: str, flag: str, value: str, message: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)
    # Push mode checks its own options too; --mode from the command line leaves COLLECTOR_MODE to the case.
    argv = [] if variable == "COLLECTOR_MODE" else ["--mode", "push"]

    status, error = run_main(argv, capsys)

    assert status == 2
    assert f"{variable} / {flag} {message}" in error


@pytest.mark.usefixtures("push_environment")
@pytest.mark.parametrize(("variable", "flag", "value", "message"), INVALID_OPTIONS)
def test_cli_invalid_flag_named(
    variable: str, flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"{flag}={value}"] if flag == "--mode" else ["--mode", "push", f"{flag}={value}"]

    status, error = run_main(argv, capsys)

    assert status == 2
    assert f"{variable} / {flag} {message}" in error


@pytest.mark.usefixtures("push_environment")
def test_cli_invalid_database_url_hidden(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "not a url:secret-password")

    status, error = run_main([], capsys)

    assert status == 2
    assert "DATABASE_URL / --database-url is invalid" in error
    assert "secret-password" not in error


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
