"""End to end in push mode: the queue POSTs batches to a collector's webhook instead of it leasing them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from system_stack import Stack, free_port
from telemetry.webhooks import generate_secret
from test_pipeline import REAL_ROWS, assert_each_row_once_per_pass, wait_for_count

pytestmark = pytest.mark.slow


def test_real_csv_two_passes_push_mode(make_stack: Callable[..., Stack], real_csv: Path, sqlite_url: str) -> None:
    port = free_port()
    stack = make_stack(
        database_url=sqlite_url,
        csv=real_csv,
        streamers=2,
        # One collector: each listens on COLLECTOR_PORT, and circus starts every process with the same environment.
        collectors=1,
        extra_env={
            "STREAMER_PASSES": "2",
            "STREAMER_INTERVAL_S": "2",
            "STREAMER_RESPAWN": "false",
            "QUEUE_PUSH_ALLOWED_NETWORKS": "127.0.0.0/8",
            "COLLECTOR_MODE": "push",
            "COLLECTOR_PORT": str(port),
            "COLLECTOR_REGISTER_URL": f"http://127.0.0.1:{port}/webhook",
            "COLLECTOR_WEBHOOK_SECRET": generate_secret(),
        },
    )
    wait_for_count(sqlite_url, 2 * REAL_ROWS, timeout_s=120)
    assert_each_row_once_per_pass(sqlite_url, passes=2, rows=REAL_ROWS)

    subscription = httpx.get(f"{stack.queue_url}/v1/queues/telemetry/subscriptions/collectors", timeout=10).json()
    assert subscription["state"] == "active"
    assert subscription["stats"]["messages_delivered"] >= 2 * REAL_ROWS
    assert subscription["stats"]["messages_dead_lettered"] == 0
    stats = httpx.get(f"{stack.queue_url}/v1/queues/telemetry", timeout=10).json()["stats"]
    assert stats["ready"] + stats["leased"] + stats["delayed"] == 0
