"""Processing timestamps of published rows."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ProcessingClock"]

# A reading at most this far behind the previous stamp is taken as a tie at the
# clock's resolution and moved just past that stamp. A larger step back is a clock
# adjustment, and the stamps follow the clock.
_TIE_WINDOW_US = 1_000


class ProcessingClock:
    """Read the wall clock once per row and format the time as ``format_timestamp`` does.

    ``stamp()`` returns RFC 3339 UTC text with microseconds, for example
    ``2026-01-02T03:04:05.000006Z``. Successive stamps are distinct and increasing:
    a row stamped in the same microsecond as the previous one, or when the clock
    reads up to 1 ms behind it, gets the previous stamp plus one microsecond.
    The date and time up to the second are formatted once per second, because
    formatting a ``datetime`` per row cost more than reading the clock.
    """

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._last_us = -1
        self._second = -1
        self._second_prefix = ""

    def stamp(self) -> str:
        """Return the current time as RFC 3339 UTC text, later than every earlier stamp but after a clock step back."""
        now_us = self._clock_ns() // 1000
        if now_us <= self._last_us < now_us + _TIE_WINDOW_US:
            now_us = self._last_us + 1
        self._last_us = now_us

        second, microsecond = divmod(now_us, 1_000_000)
        if second != self._second:
            self._second = second
            self._second_prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        return f"{self._second_prefix}{microsecond:06d}Z"
