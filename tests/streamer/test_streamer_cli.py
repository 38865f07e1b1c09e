"""Command lines: the sample generator, the streamer's options and its HTTP endpoints."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamer.__main__ import CONFIG_SOURCES, DEFAULT_CSV, build_parser
from streamer.__main__ import main as streamer_main
from streamer.worker import StreamerConfig
from streamer.sample import main as sample_main
from telemetry.settings import InvalidConfig

REPO = Path(__file__).resolve().parents[2]


def run_streamer(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_sample_cli_is_deterministic(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    options = ["--hosts", "2", "--gpus-per-host", "3", "--scrapes", "2"]

    assert sample_main([*options, "--seed", "5", "-o", str(first)]) == 0
    assert sample_main([*options, "--seed", "5", "-o", str(second)]) == 0
    assert sample_main([*options, "--seed", "6", "-o", str(other)]) == 0

    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    assert len(first.read_bytes().splitlines()) == 1 + 2 * 3 * 10 * 2


def test_committed_sample_is_generator_output(tmp_path: Path) -> None:
    regenerated = tmp_path / "sample.csv"

    assert sample_main(["-o", str(regenerated)]) == 0

    assert regenerated.read_bytes() == DEFAULT_CSV.read_bytes()


def test_sample_cli_rejects_zero_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--hosts", "0"])

    assert exit_info.value.code == 2
    assert "--hosts must be at least 1" in capsys.readouterr().err


def test_streamer_help_names_variables() -> None:
    result = run_streamer("--help")

    assert result.returncode == 0
    for variable in ("STREAMER_QUEUE_URLS", "STREAMER_CSV", "STREAMER_INTERVAL_S", "STREAMER_RATE", "STREAMER_PASSES"):
        assert variable in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--csv", "/nonexistent/dump.csv"], {}, "STREAMER_CSV / --csv is invalid: CSV file '/nonexistent/dump.csv' does not exist"),
        ([], {"STREAMER_PORT": "abc"}, "STREAMER_PORT='abc' is invalid"),
        (["--batch-size", "5000"], {}, "STREAMER_BATCH_SIZE / --batch-size = 5000 is invalid: expected 1 to 1000"),
        (["--log-level", "LOUD"], {}, "STREAMER_LOG_LEVEL / --log-level = 'LOUD' is invalid"),
    ],
    ids=["missing-csv", "invalid-variable", "oversized-batch", "invalid-log-level"],
)
def test_streamer_start_errors_exit_2(args: list[str], env: dict[str, str], message: str) -> None:
    result = run_streamer(*args, "--port", "0", "--queue-urls", "http://127.0.0.1:9", **env)

    assert result.returncode == 2
    assert message in result.stderr


# Each validated option: the variable, its flag, an invalid value and the message after "VARIABLE / FLAG".
INVALID_OPTIONS = [
    ("STREAMER_QUEUE_URLS", "--queue-urls", ",", "= ',' is invalid: expected one or more comma-separated URLs"),
    ("STREAMER_INTERVAL_S", "--interval", "-1", "= -1.0 is invalid: expected 0 or more seconds"),
    ("STREAMER_RATE", "--rate", "-0.5", "= -0.5 is invalid: expected 0 or more rows per second"),
    ("STREAMER_BATCH_SIZE", "--batch-size", "0", "= 0 is invalid: expected 1 to 1000"),
    ("STREAMER_PASSES", "--passes", "-1", "= -1 is invalid: expected 0 or more"),
    ("STREAMER_ROWS_PER_SHARD", "--rows-per-shard", "0", "= 0 is invalid: expected 1 or more"),
    ("STREAMER_LEASE_TIMEOUT_S", "--lease-timeout", "1.5", "= 1.5 is invalid: expected 2 or more seconds"),
    ("STREAMER_CONCURRENT_SHARDS", "--concurrent-shards", "17", "= 17 is invalid: expected 1 to 16"),
    ("STREAMER_CACHE_ROWS", "--cache-rows", "-1", "= -1 is invalid: expected 0 or more"),
    ("STREAMER_PORT", "--port", "70000", "= 70000 is invalid: expected 0 to 65535"),
    ("STREAMER_LOG_LEVEL", "--log-level", "loud", "= 'loud' is invalid: expected one of DEBUG, INFO, WARNING, ERROR"),
]


@pytest.fixture
def streamer_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear the STREAMER_ variables, so that each case sets only its own."""
    for name in list(os.environ):
        if name.startswith("STREAMER_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("streamer_environment")
@pytest.mark.parametrize(("variable", "flag", "value", "message"), INVALID_OPTIONS)
def test_invalid_variable_named(
    variable: str, flag: str, value: str, message: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(variable, value)

    status = streamer_main([])

    assert status == 2
    assert f"{variable} / {flag} {message}" in capsys.readouterr().err


@pytest.mark.usefixtures("streamer_environment")
@pytest.mark.parametrize(("variable", "flag", "value", "message"), INVALID_OPTIONS)
def test_invalid_flag_named(
    variable: str, flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = streamer_main([f"{flag}={value}"])

    assert status == 2
    assert f"{variable} / {flag} {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "valid", "invalid"),
    [
        ("interval_s", 0.0, -0.001),
        ("rate", 0.0, -0.001),
        ("batch_size", 1000, 1001),
        ("passes", 0, -1),
        ("rows_per_shard", 1, 0),
        ("lease_timeout_s", 2.0, 1.999),
        ("concurrent_shards", 1, 0),
        ("concurrent_shards", 16, 17),
        ("cache_rows", 0, -1),
    ],
)
def test_config_range_edges(field: str, valid: float, invalid: float) -> None:
    """``StreamerConfig`` accepts each range's edge, rejects the value past it and names the field."""
    StreamerConfig(csv_path=DEFAULT_CSV, **{field: valid})
    with pytest.raises(InvalidConfig) as rejected:
        StreamerConfig(csv_path=DEFAULT_CSV, **{field: invalid})

    assert rejected.value.field == field
    assert rejected.value.value == invalid
    assert field in CONFIG_SOURCES


def test_config_sources_name_real_flags() -> None:
    help_text = " ".join(build_parser().format_help().split())
    fields = {field.name for field in dataclasses.fields(StreamerConfig)}

    for field, (variable, flag) in CONFIG_SOURCES.items():
        assert field in fields
        assert flag in help_text
        assert variable in help_text


def test_streamer_endpoints_and_sigterm(queue_server: Any, streamers: Any) -> None:
    process = streamers(queue_server.url, DEFAULT_CSV, interval=0.2)
    base = f"http://127.0.0.1:{process.metrics_port()}"
    deadline = time.monotonic() + 15
    while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, process.log_text()
        time.sleep(0.05)
    while process.metric("streamer_rows_published_total") < 320:
        assert time.monotonic() < deadline, process.log_text()
        time.sleep(0.05)

    health = httpx.get(f"{base}/healthz", timeout=5)
    metrics = httpx.get(f"{base}/metrics", timeout=5).text
    process.process.send_signal(signal.SIGTERM)
    code = process.wait(timeout_s=10)

    assert health.status_code == 200
    assert 'streamer_rows_rejected_total{reason="invalid_value"} 0.0' in metrics
    assert "streamer_publish_seconds_bucket" in metrics
    assert "streamer_schedule_lag_seconds" in metrics
    assert code == 0
    assert "streamer stopped" in process.log_text()


def test_streamer_with_queue_tokens(start_queue_server: Any, streamers: Any, small_csv: Path) -> None:
    server = start_queue_server(QUEUE_TOKENS="publish,consume,admin:streamer-secret;consume:reader-secret")

    good = streamers(server.url, small_csv, passes=1, interval=0, queue_token="streamer-secret")
    wrong = streamers(server.url, small_csv, passes=1, interval=0, queue_token="not-a-token")
    good_code = good.wait(timeout_s=30)
    wrong_code = wrong.wait(timeout_s=30)
    stats = httpx.get(
        f"{server.url}/v1/queues/telemetry", headers={"authorization": "Bearer reader-secret"}, timeout=5
    ).json()["stats"]

    assert good_code == 0
    assert stats["published_total"] == 80
    assert wrong_code == 2
    assert "the queue rejected a request" in wrong.log_text()
    assert "not-a-token" not in wrong.log_text()
