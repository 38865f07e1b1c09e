"""Retry, backoff and concurrency decisions of the dispatcher, with respx in place of the network.

The endpoint host resolves through a table to 127.0.0.1, and respx responds to
every request, so nothing leaves the process.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import respx

from queue_server.push.backoff import (
    MAX_RETRY_AFTER_S,
    ConcurrencyLimit,
    Outcome,
    backoff_delay,
    classify_status,
    parse_retry_after,
)
from queue_server.push.dispatcher import PushDispatcher
from queue_server.push.guard import EndpointGuard, StaticResolver, parse_networks
from queue_server.push.registry import SubscriptionRegistry
from queue_server.push.sender import PushMessage, WebhookSender
from queue_server.push.subscription import RetrySettings, Subscription

ENDPOINT = "http://receiver.test:8080/hook"
PINNED = "http://127.0.0.1:8080/hook"


@dataclass
class FakeSource:
    """An in-memory queue: hands out ``batches`` once each and records acks and nacks."""

    batches: list[list[PushMessage]]
    max_deliveries_value: int | None = 5
    acks: list[list[str]] = field(default_factory=list)
    nacks: list[dict[str, Any]] = field(default_factory=list)

    async def lease(self, queue: str, max_messages: int, wait_s: float, visibility_timeout_s: float) -> list[PushMessage]:
        if self.batches:
            return self.batches.pop(0)
        await asyncio.sleep(0.01)
        return []

    async def ack(self, queue: str, receipts: Sequence[str]) -> None:
        self.acks.append(list(receipts))

    async def nack(self, queue: str, receipts: Sequence[str], *, delay_s: float, dead_letter: bool, reason: str | None) -> None:
        self.nacks.append({"receipts": list(receipts), "delay_s": delay_s, "dead_letter": dead_letter, "reason": reason})

    def max_deliveries(self, queue: str) -> int | None:
        return self.max_deliveries_value

    def backlog(self, queue: str) -> int:
        return sum(len(batch) for batch in self.batches)


def message(number: int, deliveries: int = 1) -> PushMessage:
    return PushMessage(f"1-{number}", f"1-{number}-{deliveries}-1", deliveries, "2026-01-01T00:00:00.000000Z", {"n": number})


def make_registry(**fields: Any) -> SubscriptionRegistry:
    registry = SubscriptionRegistry()
    body = {"endpoint": ENDPOINT, "retry": {"initial_backoff_s": 0.1, "max_backoff_s": 0.4}, **fields}
    registry.apply_put(registry.plan_put("jobs", "hook", body, time.time()).subscription)
    return registry


class Harness:
    def __init__(self, source: FakeSource, registry: SubscriptionRegistry, resolver: StaticResolver | None = None) -> None:
        self.source = source
        self.registry = registry
        self.disabled: list[str] = []
        resolver = resolver or StaticResolver({"receiver.test": ["127.0.0.1"]})
        guard = EndpointGuard(allowed_networks=parse_networks(["127.0.0.0/8"]), resolver=resolver)
        # The largest draw of the jitter range, so delays are predictable.
        self.dispatcher = PushDispatcher(
            registry=registry,
            source=source,
            sender=WebhookSender(guard=guard),
            disable=self._disable,
            wait_s=0.01,
            uniform=lambda low, high: high,
        )

    async def _disable(self, subscription: Subscription, reason: str) -> None:
        self.disabled.append(reason)
        self.registry.apply_put(subscription.disabled(reason))
        self.dispatcher.reconcile()

    async def run_until(self, condition: Any, timeout_s: float = 5.0) -> None:
        self.dispatcher.start()
        try:
            deadline = time.monotonic() + timeout_s
            while not condition():
                if time.monotonic() > deadline:
                    raise AssertionError("condition not reached")
                await asyncio.sleep(0.01)
        finally:
            await self.dispatcher.close(grace_s=1)


def worker_stats(harness: Harness) -> dict[str, Any]:
    return harness.dispatcher.stats("jobs", "hook")


@respx.mock(assert_all_mocked=True)
async def _scenario_500_then_200(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(PINNED).mock(side_effect=[httpx.Response(500), httpx.Response(200)])
    source = FakeSource([[message(1)], [message(1, deliveries=2)]])
    harness = Harness(source, make_registry())
    await harness.run_until(lambda: source.acks)

    assert route.call_count == 2
    assert source.nacks == [{"receipts": ["1-1-1-1"], "delay_s": 0.1, "dead_letter": False, "reason": None}]
    assert source.acks == [["1-1-2-1"]]
    stats = worker_stats(harness)
    assert stats["attempts"] == {"retryable_status": 1, "delivered": 1}
    assert stats["consecutive_failures"] == 0
    assert stats["concurrency"] == 2


def test_500_is_nacked_with_backoff_then_acked() -> None:
    asyncio.run(_scenario_500_then_200())


@respx.mock(assert_all_mocked=True)
async def _scenario_streak(respx_mock: respx.MockRouter) -> None:
    respx_mock.post(PINNED).mock(return_value=httpx.Response(503))
    source = FakeSource([[message(1, d)] for d in range(1, 5)], max_deliveries_value=None)
    harness = Harness(source, make_registry())
    await harness.run_until(lambda: len(source.nacks) == 4)

    assert [nack["delay_s"] for nack in source.nacks] == [0.1, 0.2, 0.4, 0.4]
    assert worker_stats(harness)["consecutive_failures"] == 4


def test_backoff_doubles_up_to_max() -> None:
    asyncio.run(_scenario_streak())


@respx.mock(assert_all_mocked=True)
async def _scenario_retry_after(respx_mock: respx.MockRouter) -> None:
    respx_mock.post(PINNED).mock(return_value=httpx.Response(429, headers={"retry-after": "7"}))
    source = FakeSource([[message(1)]])
    harness = Harness(source, make_registry())
    await harness.run_until(lambda: source.nacks)

    assert source.nacks[0]["delay_s"] == 7.0
    worker = harness.dispatcher.workers[("jobs", "hook")]
    assert worker.paused_until - time.monotonic() > 6.0


def test_retry_after_sets_nack_delay_and_pause() -> None:
    asyncio.run(_scenario_retry_after())


@respx.mock(assert_all_mocked=True)
async def _scenario_exhausted(respx_mock: respx.MockRouter) -> None:
    respx_mock.post(PINNED).mock(return_value=httpx.Response(500))
    source = FakeSource([[message(1, deliveries=3), message(2, deliveries=1)]], max_deliveries_value=3)
    harness = Harness(source, make_registry())
    await harness.run_until(lambda: len(source.nacks) == 2)

    dead, retried = source.nacks
    assert dead["receipts"] == ["1-1-3-1"]
    assert dead["dead_letter"] is True
    assert "retryable_status: HTTP 500" in dead["reason"]
    assert retried == {"receipts": ["1-2-1-1"], "delay_s": 0.1, "dead_letter": False, "reason": None}
    assert worker_stats(harness)["messages_dead_lettered"] == 1


def test_last_allowed_delivery_is_dead_lettered() -> None:
    asyncio.run(_scenario_exhausted())


@respx.mock(assert_all_mocked=True)
async def _scenario_gone(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(PINNED).mock(return_value=httpx.Response(410))
    source = FakeSource([[message(1)], [message(2)]])
    harness = Harness(source, make_registry())
    await harness.run_until(lambda: source.nacks)
    await asyncio.sleep(0.05)

    assert route.call_count == 1
    assert len(harness.disabled) == 1
    assert source.nacks == [{"receipts": ["1-1-1-1"], "delay_s": 0, "dead_letter": False, "reason": None}]
    assert harness.registry.get("jobs", "hook").state.value == "disabled"


def test_410_disables_and_returns_batch() -> None:
    asyncio.run(_scenario_gone())


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (httpx.ReadTimeout("read timed out"), "timeout"),
        (httpx.ConnectError("connection refused"), "connection_error"),
    ],
    ids=["timeout", "connection-error"],
)
def test_transport_failures_are_retried(error: Exception, outcome: str) -> None:
    @respx.mock(assert_all_mocked=True)
    async def scenario(respx_mock: respx.MockRouter) -> None:
        respx_mock.post(PINNED).mock(side_effect=error)
        source = FakeSource([[message(1)]])
        harness = Harness(source, make_registry())
        await harness.run_until(lambda: source.nacks)
        assert source.nacks[0]["delay_s"] == 0.1
        assert worker_stats(harness)["attempts"] == {outcome: 1}

    asyncio.run(scenario())


@respx.mock(assert_all_mocked=True)
async def _scenario_redirect(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(PINNED).mock(return_value=httpx.Response(302, headers={"location": "http://127.0.0.1:9/x"}))
    source = FakeSource([[message(1)]])
    harness = Harness(source, make_registry())
    await harness.run_until(lambda: source.nacks)

    assert route.call_count == 1
    assert worker_stats(harness)["attempts"] == {"rejected_status": 1}


def test_redirect_is_not_followed() -> None:
    asyncio.run(_scenario_redirect())


@respx.mock(assert_all_mocked=True)
async def _scenario_pinning(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(PINNED).mock(return_value=httpx.Response(204))
    source = FakeSource([[message(1)]])
    harness = Harness(source, make_registry())
    await harness.run_until(lambda: source.acks)

    request = route.calls.last.request
    assert request.url.host == "127.0.0.1"
    assert request.headers["host"] == "receiver.test:8080"
    assert "sni_hostname" not in request.extensions


def test_request_is_pinned_to_resolved_address() -> None:
    asyncio.run(_scenario_pinning())


@respx.mock(assert_all_mocked=True)
async def _scenario_https_sni(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post("https://127.0.0.1:443/hook").mock(return_value=httpx.Response(200))
    source = FakeSource([[message(1)]])
    harness = Harness(source, make_registry(endpoint="https://receiver.test/hook"))
    await harness.run_until(lambda: source.acks)

    request = route.calls.last.request
    assert request.headers["host"] == "receiver.test"
    assert request.extensions["sni_hostname"] == "receiver.test"


def test_https_sets_sni_to_host_name() -> None:
    asyncio.run(_scenario_https_sni())


@respx.mock(assert_all_mocked=True)
async def _scenario_rebinding(respx_mock: respx.MockRouter) -> None:
    source = FakeSource([[message(1)]])
    # The name passed the check at subscription time and now resolves to the metadata address.
    resolver = StaticResolver({"receiver.test": ["169.254.169.254"]})
    harness = Harness(source, make_registry(), resolver=resolver)
    await harness.run_until(lambda: source.nacks)

    assert respx_mock.calls.call_count == 0
    stats = worker_stats(harness)
    assert stats["attempts"] == {"address_rejected": 1}
    assert "169.254.169.254" in stats["last_error"]


def test_rebound_name_is_rejected_without_request() -> None:
    asyncio.run(_scenario_rebinding())


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (202, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (410, Outcome.GONE),
        (429, Outcome.RETRYABLE_STATUS),
        (500, Outcome.RETRYABLE_STATUS),
        (503, Outcome.RETRYABLE_STATUS),
        (400, Outcome.REJECTED_STATUS),
        (401, Outcome.REJECTED_STATUS),
        (404, Outcome.REJECTED_STATUS),
        (301, Outcome.REJECTED_STATUS),
    ],
    ids=str,
)
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("5", 5.0),
        ("0", 0.0),
        ("999999", MAX_RETRY_AFTER_S),
        ("Thu, 01 Jan 1970 00:01:40 GMT", 40.0),
        ("Thu, 01 Jan 1970 00:00:10 GMT", 0.0),
        ("soon", None),
        ("-3", None),
    ],
    ids=["absent", "seconds", "zero", "capped", "http-date", "past-date", "garbage", "negative"],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=60.0) == expected


def test_backoff_full_jitter_range() -> None:
    retry = RetrySettings(initial_backoff_s=1.0, max_backoff_s=30.0)
    ranges: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        ranges.append((low, high))
        return low

    delays = [backoff_delay(retry, failures, None, uniform=record) for failures in (1, 2, 3, 6, 40)]
    assert ranges == [(0.0, 1.0), (0.0, 2.0), (0.0, 4.0), (0.0, 30.0), (0.0, 30.0)]
    assert delays == [0.0] * 5
    assert backoff_delay(retry, 1, 12.5, uniform=record) == 12.5


def test_concurrency_limit_aimd() -> None:
    limit = ConcurrencyLimit(maximum=8)
    for _ in range(10):
        limit.on_success()
    assert limit.current == 8
    limit.on_failure()
    assert limit.current == 4
    limit.on_failure()
    limit.on_failure()
    limit.on_failure()
    assert limit.current == 1
    limit.on_success()
    assert limit.current == 2
    limit.resize(1)
    assert limit.current == 1


@respx.mock(assert_all_mocked=True)
async def _scenario_sends_leave_garbage(respx_mock: respx.MockRouter) -> list[object]:
    respx_mock.post(PINNED).mock(return_value=httpx.Response(200))
    guard = EndpointGuard(
        allowed_networks=parse_networks(["127.0.0.0/8"]),
        resolver=StaticResolver({"receiver.test": ["127.0.0.1"]}),
    )
    sender = WebhookSender(guard=guard)
    subscription = make_registry().get("jobs", "hook")
    try:
        await sender.send(subscription, [message(1)])
        gc.collect()
        gc.garbage.clear()
        for number in range(3):
            result = await sender.send(subscription, [message(number)])
            assert result.outcome is Outcome.DELIVERED
        gc.collect()
        return [item for item in gc.garbage if type(item).__module__.startswith("httpx")]
    finally:
        await sender.aclose()


def test_sent_requests_leave_no_response_cycles() -> None:
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        left = asyncio.run(_scenario_sends_leave_garbage())
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()

    assert sorted({type(item).__name__ for item in left}) == [], "httpx objects freed only by the cyclic garbage collector"
