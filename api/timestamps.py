"""Parsing of RFC 3339 timestamps given as query parameters, and their output form.

The database stores microseconds, so a bound with finer fractional seconds is
rounded toward the inside of the range it limits: a start bound rounds up and an
end bound rounds down. An inclusive range then never admits a sample that lies
outside the bounds the client wrote.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, datetime, timedelta, timezone

from telemetry.record import format_timestamp

__all__ = ["InvalidTimestamp", "Rounding", "format_rfc3339", "parse_rfc3339"]

_RFC3339 = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})[Tt]"
    r"(?P<hour>\d{2}):(?P<minute>\d{2}):(?P<second>\d{2})(?:\.(?P<fraction>\d+))?"
    r"(?P<offset>[Zz]|[+-]\d{2}:\d{2})"
)

# A date-time whose '+hh:mm' offset lost its '+' to query-string decoding.
_PLUS_AS_SPACE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)? \d{2}:\d{2}")


#: The output form of every API time, shared with the queue messages: RFC 3339 UTC
#: with six fraction digits, e.g. ``2025-07-18T20:42:34.500000Z``, so that the
#: strings sort in time order. orjson writes the same form with ``OPT_UTC_Z``,
#: except that it leaves the fraction out when it is zero.
format_rfc3339 = format_timestamp


class InvalidTimestamp(ValueError):
    """A string that is not an RFC 3339 date-time with a UTC offset."""


class Rounding(enum.Enum):
    """Direction in which sub-microsecond digits are rounded."""

    UP = "up"
    DOWN = "down"


def parse_rfc3339(text: str, rounding: Rounding = Rounding.DOWN) -> datetime:
    """Parse an RFC 3339 date-time such as ``2025-07-18T20:42:34.5+02:00`` into aware UTC.

    The offset (``Z`` or ``±hh:mm``) is required. Fractional seconds may have any
    number of digits; digits past the microsecond are rounded by ``rounding``.
    A leap second (``:60``) maps to the last representable microsecond of that
    minute when rounding down and to the next minute when rounding up.
    Raises ``InvalidTimestamp`` with a message fit for an API client.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        hint = ""
        if _PLUS_AS_SPACE.fullmatch(text):
            # A '+' left unescaped in a query string arrives as a space.
            hint = "; a '+' in a URL query string must be sent as %2B"
        raise InvalidTimestamp(
            f"{text!r} is not an RFC 3339 date-time: expected a form such as "
            f"'2025-07-18T20:42:34Z' or '2025-07-18T22:42:34.5+02:00'{hint}"
        )

    fraction = match["fraction"] or ""
    microsecond = int(fraction[:6].ljust(6, "0"))
    round_up = rounding is Rounding.UP and fraction[6:].strip("0") != ""
    second = int(match["second"])
    leap_second = second == 60
    if leap_second:
        second = 59

    try:
        moment = datetime(
            int(match["year"]),
            int(match["month"]),
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            second,
            microsecond,
            tzinfo=_parse_offset(match["offset"]),
        )
        if leap_second:
            moment = moment.replace(microsecond=999_999)
            round_up = rounding is Rounding.UP
        if round_up:
            moment += timedelta(microseconds=1)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidTimestamp(f"{text!r} is not a valid date-time: {exc}") from exc


def _parse_offset(offset: str) -> timezone:
    if offset in ("Z", "z"):
        return UTC
    hours, minutes = int(offset[1:3]), int(offset[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError(f"UTC offset {offset!r} is out of range")
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if offset[0] == "-" else delta)
