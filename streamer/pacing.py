"""Rows-per-second cap for publishing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Spread publishes so that on average at most ``rows_per_s`` rows go out per second.

    ``rows_per_s <= 0`` means no cap. A batch of ``n`` rows waits until the previous
    batches' share of time has passed, so a burst never exceeds one batch.
    """

    def __init__(
        self,
        rows_per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rows_per_s = rows_per_s
        self._clock = clock
        self._sleep = sleep
        self._next_free = 0.0

    async def acquire(self, rows: int) -> float:
        """Wait until ``rows`` rows may be published; return the seconds waited."""
        if self.rows_per_s <= 0:
            return 0.0
        now = self._clock()
        start = max(now, self._next_free)
        self._next_free = start + rows / self.rows_per_s
        wait = start - now
        if wait > 0:
            await self._sleep(wait)
        return wait
