"""Every pipeline component raises the garbage collector's young-generation threshold and exports process metrics."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import collector.__main__ as collector_main
import queue_server.__main__ as queue_main
import streamer.__main__ as streamer_main
from collector.metrics import CollectorMetrics
from queue_server.metrics import build_registry
from queue_server.service import QueueService, ServiceOptions
from streamer.metrics import StreamerMetrics
from telemetry.process import YOUNG_GENERATION_THRESHOLD, configure_garbage_collector


@pytest.fixture
def restore_thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield before
    gc.set_threshold(*before)


def test_young_threshold_raised_older_kept(restore_thresholds: tuple[int, int, int]) -> None:
    gc.set_threshold(700, 11, 12)

    configure_garbage_collector()

    assert gc.get_threshold() == (YOUNG_GENERATION_THRESHOLD, 11, 12)


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        (queue_main, ["--port", "0"]),
        (collector_main, []),
        (streamer_main, []),
    ],
    ids=["queue", "collector", "streamer"],
)
def test_entry_point_configures_collector(
    restore_thresholds: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Any, module: Any, argv: list[str]
) -> None:
    seen: list[tuple[int, int, int]] = []

    async def serve(*args: Any) -> int:
        seen.append(gc.get_threshold())
        return 0

    monkeypatch.setattr(module, "serve", serve)
    monkeypatch.chdir(tmp_path)

    assert module.main(argv) == 0
    assert seen and seen[0][0] == YOUNG_GENERATION_THRESHOLD



def _queue_registry(tmp_path: Path) -> CollectorRegistry:
    return build_registry(QueueService(ServiceOptions(data_dir=tmp_path)))


def _collector_registry(tmp_path: Path) -> CollectorRegistry:
    return CollectorMetrics().registry


def _streamer_registry(tmp_path: Path) -> CollectorRegistry:
    return StreamerMetrics().registry


@pytest.mark.parametrize(
    "registry_of", [_queue_registry, _collector_registry, _streamer_registry], ids=["queue", "collector", "streamer"]
)
def test_component_exports_process_metrics(tmp_path: Path, registry_of: Callable[[Path], CollectorRegistry]) -> None:
    text = generate_latest(registry_of(tmp_path)).decode()

    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_gc_collections_total", "python_info"):
        assert f"\n{name}" in text, f"{name} missing from the metrics"
