"""Freeing httpx responses by reference counting, without the cyclic garbage collector."""

from __future__ import annotations

import httpx

_EMPTY_STREAM = httpx.ByteStream(b"")


def release_stream(response: httpx.Response) -> None:
    """Replace a closed response's stream with an empty one, so the response is freed at once.

    httpx (0.28 and 0.29) wraps the stream of every response in an object that
    refers back to the response. Only the cyclic garbage collector frees such a
    cycle, and until it runs the cycle keeps the request and response bodies in
    memory. With the young-generation threshold of ``telemetry.process``, a
    streamer held about 200 MB of its 400 KB publish requests this way. Call this
    once the response is closed or fully read.
    """
    response.stream = _EMPTY_STREAM
