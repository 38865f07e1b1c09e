"""Units of the API that need no database: timestamps, cursors and settings."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from api.__main__ import parse_args
from api.cursor import Cursor, InvalidCursor, query_fingerprint
from api.problems import _RateLimitedLog
from api.settings import ApiSettings
from api.timestamps import InvalidTimestamp, Rounding, format_rfc3339, parse_rfc3339
from telemetry.settings import SettingsError


@pytest.mark.parametrize(
    ("text", "rounding", "expected"),
    [
        ("2025-07-18T20:42:34Z", Rounding.DOWN, datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)),
        ("2025-07-18T22:42:34+02:00", Rounding.DOWN, datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)),
        ("2025-07-18T15:12:34-05:30", Rounding.DOWN, datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)),
        (
            "2025-07-18t20:42:34.5z",
            Rounding.DOWN,
            datetime(2025, 7, 18, 20, 42, 34, 500_000, tzinfo=UTC),
        ),
        (
            "2025-07-18T20:42:34.1234567Z",
            Rounding.DOWN,
            datetime(2025, 7, 18, 20, 42, 34, 123_456, tzinfo=UTC),
        ),
        (
            "2025-07-18T20:42:34.1234561Z",
            Rounding.UP,
            datetime(2025, 7, 18, 20, 42, 34, 123_457, tzinfo=UTC),
        ),
        (
            "2025-07-18T20:42:34.1234560Z",
            Rounding.UP,
            datetime(2025, 7, 18, 20, 42, 34, 123_456, tzinfo=UTC),
        ),
        (
            "2016-12-31T23:59:60Z",
            Rounding.DOWN,
            datetime(2016, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        ),
        ("2016-12-31T23:59:60Z", Rounding.UP, datetime(2017, 1, 1, tzinfo=UTC)),
    ],
    ids=[
        "utc",
        "plus-offset",
        "minus-offset",
        "lowercase-fraction",
        "nanoseconds-down",
        "nanoseconds-up",
        "trailing-zero-up",
        "leap-second-down",
        "leap-second-up",
    ],
)
def test_parse_rfc3339_valid(text: str, rounding: Rounding, expected: datetime) -> None:
    parsed = parse_rfc3339(text, rounding)

    assert parsed == expected
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize(
    "text",
    [
        "2025-07-18T20:42:34",
        "2025-07-18 20:42:34Z",
        "2025-07-18",
        "20250718T204234Z",
        "2025-13-01T00:00:00Z",
        "2025-07-18T24:00:00Z",
        "2025-07-18T20:42:34+2400",
        "2025-07-18T20:42:34+24:00",
        "9999-12-31T23:59:59-01:00",
        "",
    ],
)
def test_parse_rfc3339_invalid(text: str) -> None:
    with pytest.raises(InvalidTimestamp, match="date-time"):
        parse_rfc3339(text)


def test_cursor_round_trip() -> None:
    fingerprint = query_fingerprint("GPU-1", None, None, [])
    cursor = Cursor(
        timestamp=datetime(2025, 7, 18, 20, 0, 0, 7, tzinfo=UTC),
        sample_id=42,
        fingerprint=fingerprint,
    )

    decoded = Cursor.decode(cursor.encode(), fingerprint=fingerprint)

    assert decoded == cursor


def test_cursor_other_query_rejected() -> None:
    cursor = Cursor(
        timestamp=datetime(2025, 7, 18, tzinfo=UTC),
        sample_id=1,
        fingerprint=query_fingerprint("GPU-1", None, None, ["A"]),
    ).encode()

    with pytest.raises(InvalidCursor, match="different query"):
        Cursor.decode(cursor, fingerprint=query_fingerprint("GPU-1", None, None, ["B"]))


def test_query_fingerprint_ignores_metric_order() -> None:
    assert query_fingerprint("G", None, None, ["A", "B"]) == query_fingerprint(
        "G", None, None, ["B", "A", "A"]
    )


@pytest.mark.parametrize(
    "text",
    [
        "!!!",
        "e30",  # {}
        "eyJ2IjoyfQ",  # {"v":2}
        "eyJ2IjoxLCJ0IjoiMSIsImkiOjEsInEiOiJ4In0",  # "t" is a string
        "eyJ2IjoxLCJ0IjoxZTk5OSwiaSI6MSwicSI6IngifQ",  # "t" is a float
        "eyJ2IjoxLCJ0Ijo5OTk5OTk5OTk5OTk5OTk5OTk5LCJpIjoxLCJxIjoieCJ9",  # "t" out of range
        "x" * 600,
    ],
    ids=[
        "not-base64",
        "empty-object",
        "other-version",
        "string-time",
        "float-time",
        "huge-time",
        "too-long",
    ],
)
def test_cursor_malformed_rejected(text: str) -> None:
    with pytest.raises(InvalidCursor):
        Cursor.decode(text, fingerprint="x")


def test_settings_from_env_defaults() -> None:
    settings = ApiSettings.from_env({})

    assert settings == ApiSettings(database_url="sqlite:///data/telemetry.db")
    assert settings.port == 8000
    assert settings.host == "127.0.0.1"
    assert settings.token == ""


def test_settings_from_env_values() -> None:
    settings = ApiSettings.from_env(
        {
            "DATABASE_URL": "postgresql://db/telemetry",
            "API_HOST": "0.0.0.0",
            "API_PORT": "9000",
            "API_WORKERS": "3",
            "API_THREADS": "2",
            "API_TOKEN": "abc",
            "API_LOG_LEVEL": "debug",
        }
    )

    assert settings == ApiSettings(
        database_url="postgresql://db/telemetry",
        host="0.0.0.0",
        port=9000,
        workers=3,
        threads=2,
        token="abc",
        log_level="DEBUG",
    )


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"API_PORT": "eighty"}, "API_PORT"),
        ({"API_PORT": "70000"}, "API_PORT"),
        ({"API_WORKERS": "0"}, "API_WORKERS"),
        ({"API_THREADS": "-1"}, "API_THREADS"),
        ({"API_LOG_LEVEL": "loud"}, "API_LOG_LEVEL"),
    ],
)
def test_settings_invalid_names_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        ApiSettings.from_env(environ)


def test_flags_override_environment() -> None:
    defaults = ApiSettings(database_url="sqlite:///a.db", port=8000)

    settings = parse_args(
        ["--port", "9100", "--database-url", "sqlite:///b.db", "--workers", "2"], defaults
    )

    assert settings.port == 9100
    assert settings.database_url == "sqlite:///b.db"
    assert settings.workers == 2
    assert settings.threads == defaults.threads


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC), "2025-07-18T20:42:34.000000Z"),
        (datetime(2025, 7, 18, 20, 42, 34, 500_000, tzinfo=UTC), "2025-07-18T20:42:34.500000Z"),
        (datetime(2025, 7, 18, 20, 42, 34, 7, tzinfo=UTC), "2025-07-18T20:42:34.000007Z"),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000000Z"),
        (datetime(999, 12, 31, 23, 59, 59, 5, tzinfo=UTC), "0999-12-31T23:59:59.000005Z"),
    ],
    ids=["whole-second", "half-second", "one-microsecond", "year-1", "year-999"],
)
def test_format_rfc3339_six_fraction_digits(moment: datetime, expected: str) -> None:
    assert format_rfc3339(moment) == expected
    if moment.microsecond:
        # Page bodies leave non-zero fractions to orjson, which must agree.
        assert orjson.dumps(moment, option=orjson.OPT_UTC_Z).decode() == f'"{expected}"'


def test_format_rfc3339_sorts_in_time_order() -> None:
    moments = [datetime(2025, 7, 18, 20, 42, 34, micro, tzinfo=UTC) for micro in (0, 1, 10, 999_999)]
    moments.append(datetime(2025, 7, 18, 20, 42, 35, tzinfo=UTC))
    texts = [format_rfc3339(moment) for moment in moments]
    assert texts == sorted(texts)


def test_cursor_sample_id_out_of_range_rejected() -> None:
    fingerprint = query_fingerprint("GPU-1", None, None, [])
    cursor = Cursor(
        timestamp=datetime(2025, 7, 18, tzinfo=UTC), sample_id=2**63, fingerprint=fingerprint
    )

    with pytest.raises(InvalidCursor, match="out-of-range sample id"):
        Cursor.decode(cursor.encode(), fingerprint=fingerprint)


def test_rate_limited_log_counts_skipped(caplog: pytest.LogCaptureFixture) -> None:
    log = _RateLimitedLog(interval_s=3600.0)

    for attempt in range(3):
        log.warning("database down: %s", attempt)
    log._last = float("-inf")  # the interval has passed
    log.warning("database down: %s", "again")

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "database down: 0",
        "database down: again (2 similar errors since the last report)",
    ]
