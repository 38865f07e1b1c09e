"""Helpers of the streamer tests: generated CSV dumps and an in-memory stand-in for the queue client."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from streamer.sample import SampleSpec, write_sample
from telemetry.queue_client import LeasedMessage, OutgoingMessage, PublishResult, ReceiptResult

REPO = Path(__file__).resolve().parents[2]
PORT_LINE = re.compile(rb"health and metrics on http://127\.0\.0\.1:(\d+)")


class StreamerProcess:
    """A ``python -m streamer`` process with its log in a file."""

    def __init__(self, log_path: Path, queue_url: str, csv: Path, **options: Any) -> None:
        self.log_path = log_path
        command = [sys.executable]
        if _coverage_active():
            command += ["-m", "coverage", "run", "--parallel-mode"]
        command += ["-m", "streamer", "--queue-urls", queue_url, "--csv", str(csv), "--port", "0"]
        for name, value in options.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy()
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_port(self, timeout_s: float = 15.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = PORT_LINE.search(self.log_path.read_bytes())
            if match:
                return int(match.group(1))
            assert self.process.poll() is None, self.log_text()
            time.sleep(0.05)
        raise AssertionError(f"streamer did not log its port:\n{self.log_text()}")

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port()}/metrics", timeout=5).text
        match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        assert match, f"{name} not in metrics:\n{text}"
        return float(match.group(1))

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"streamer did not exit within {timeout_s} s:\n{self.log_text()}") from exc

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _coverage_active() -> bool:
    try:
        import coverage
    except ImportError:
        return False
    return coverage.Coverage.current() is not None


def write_dump(path: Path, *, hosts: int, gpus_per_host: int, seed: int = 1) -> Path:
    """Write a generated dump of ``hosts * gpus_per_host * 10`` rows to ``path``."""
    with path.open("w", encoding="utf-8", newline="") as output:
        write_sample(output, SampleSpec(hosts=hosts, gpus_per_host=gpus_per_host, seed=seed))
    return path


@dataclass
class _Message:
    id: str
    body: Any
    visible_at: float
    receipt: str | None = None
    deliveries: int = 0
    leased: bool = False


@dataclass
class _Queue:
    config: dict[str, Any]
    messages: dict[str, _Message] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    published: list[Any] = field(default_factory=list)


class FakeQueue:
    """In-memory stand-in for ``QueueClient`` with the queue's lease, delay and dedup rules.

    Only for unit tests of the streamer's control loop; the real server is tested
    with real processes.
    """

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}
        self._ids = itertools.count(1)

    async def create_queue(self, name: str, **config: Any) -> dict[str, Any]:
        queue = self.queues.setdefault(name, _Queue(config={"visibility_timeout_s": 30}))
        queue.config.update(config)
        return {"name": name, **queue.config}

    async def get_queue(self, name: str) -> dict[str, Any]:
        queue = self.queues[name]
        now = time.monotonic()
        leased = sum(1 for m in queue.messages.values() if m.leased and m.visible_at > now)
        delayed = sum(1 for m in queue.messages.values() if not m.leased and m.visible_at > now)
        stats = {"ready": len(queue.messages) - leased - delayed, "leased": leased, "delayed": delayed}
        return {"name": name, **queue.config, "stats": stats}

    async def publish(self, name: str, messages: Iterable[OutgoingMessage | Mapping[str, Any]]) -> list[PublishResult]:
        queue = self.queues[name]
        results = []
        for item in messages:
            # The client accepts the JSON form of a message as well, as the streamer sends rows.
            message = item if isinstance(item, OutgoingMessage) else OutgoingMessage(**item)
            # The body crosses the wire as JSON, which also turns an orjson.Fragment into its value.
            message = OutgoingMessage(orjson.loads(orjson.dumps(message.body)), message.key, message.delay_s)
            if message.key is not None and message.key in queue.keys:
                results.append(PublishResult(id=queue.keys[message.key], duplicate=True))
                continue
            message_id = f"m{next(self._ids)}"
            if message.key is not None:
                queue.keys[message.key] = message_id
            queue.messages[message_id] = _Message(message_id, message.body, time.monotonic() + message.delay_s)
            queue.published.append(message.body)
            results.append(PublishResult(id=message_id, duplicate=False))
        await asyncio.sleep(0)
        return results

    async def lease(
        self, name: str, *, max_messages: int = 1000, wait_s: float = 20, visibility_timeout_s: float | None = None
    ) -> list[LeasedMessage]:
        queue = self.queues[name]
        timeout = visibility_timeout_s or queue.config["visibility_timeout_s"]
        deadline = time.monotonic() + wait_s
        while True:
            now = time.monotonic()
            ready = [m for m in queue.messages.values() if m.visible_at <= now][:max_messages]
            if ready or now >= deadline:
                break
            await asyncio.sleep(0.01)
        leased = []
        for message in ready:
            message.deliveries += 1
            message.leased = True
            message.visible_at = now + timeout
            message.receipt = f"{message.id}.{message.deliveries}"
            leased.append(LeasedMessage(message.id, message.receipt, message.body, message.deliveries, ""))
        return leased

    def _settle(self, name: str, receipts: Sequence[str], status: str, action: Any) -> list[ReceiptResult]:
        queue = self.queues[name]
        results = []
        for receipt in receipts:
            message = queue.messages.get(receipt.split(".")[0])
            if message is None:
                results.append(ReceiptResult(receipt, "not_found"))
            elif message.receipt != receipt or not message.leased or message.visible_at <= time.monotonic():
                results.append(ReceiptResult(receipt, "stale"))
            else:
                action(queue, message)
                results.append(ReceiptResult(receipt, status))
        return results

    async def ack(self, name: str, receipts: Sequence[str]) -> list[ReceiptResult]:
        return self._settle(name, receipts, "acked", lambda queue, m: queue.messages.pop(m.id))

    async def nack(self, name: str, receipts: Sequence[str], *, delay_s: float = 0, **_: Any) -> list[ReceiptResult]:
        def release(queue: _Queue, message: _Message) -> None:
            message.leased = False
            message.visible_at = time.monotonic() + delay_s

        return self._settle(name, receipts, "nacked", release)

    async def extend(self, name: str, receipts: Sequence[str], *, visibility_timeout_s: float) -> list[ReceiptResult]:
        def push(queue: _Queue, message: _Message) -> None:
            message.visible_at = time.monotonic() + visibility_timeout_s

        return self._settle(name, receipts, "extended", push)

    async def aclose(self) -> None:
        return None
