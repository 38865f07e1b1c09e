"""Every pipeline component raises the young-generation threshold of the garbage collector at start."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

import collector.__main__ as collector_main
import queue_server.__main__ as queue_main
import streamer.__main__ as streamer_main
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
