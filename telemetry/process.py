"""Process-wide set-up shared by the long-running components."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

#: Net allocations of container objects that start a young-generation collection.
#: Python's default of 700 runs one every few hundred rows in these processes,
#: whose batches keep thousands of tuples and lists alive at a time, and each
#: collection scans the live ones. In the end-to-end benchmark (2 streamers, 2 collectors)
#: garbage collection took 9 to 12 % of each component's CPU time at 700, and 1 to
#: 3 % at 50,000, with pauses of up to 35 ms (ad-hoc measurement with gc.callbacks).
YOUNG_GENERATION_THRESHOLD = 50_000


def configure_garbage_collector() -> None:
    """Raise the young-generation threshold of the cyclic garbage collector, keeping the older generations' thresholds."""
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, oldest)


def register_process_metrics(registry: CollectorRegistry) -> None:
    """Add prometheus-client's process, garbage collector and platform metrics to ``registry``.

    They are ``process_cpu_seconds_total``, ``process_resident_memory_bytes`` and the
    other ``process_*`` gauges (Linux only), ``python_gc_*`` and ``python_info``.
    """
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
