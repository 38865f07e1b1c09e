"""Push delivery from a real queue server process to a real webhook endpoint on 127.0.0.1.

The queue allows the endpoint through ``QUEUE_PUSH_ALLOWED_NETWORKS=127.0.0.0/8``;
retry backoff is a few milliseconds so that each scenario takes about a second.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from telemetry.webhooks import HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP
from webhook_receiver import Answer, WebhookReceiver

QUEUE = "jobs"
FAST_RETRY = {"initial_backoff_s": 0.02, "max_backoff_s": 0.05}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as running:
        yield running


@pytest.fixture
def start_push_queue(start_queue_server: Callable[..., Any]) -> Callable[..., Any]:
    """Start a queue server that may push to loopback endpoints."""

    def start(**env: str) -> Any:
        return start_queue_server(QUEUE_PUSH_ALLOWED_NETWORKS="127.0.0.0/8", **env)

    return start


def create_queue(queue_url: str, **config: Any) -> None:
    response = httpx.put(f"{queue_url}/v1/queues/{QUEUE}", json=config, timeout=10)
    assert response.status_code in (200, 201), response.text


def subscribe(queue_url: str, receiver: WebhookReceiver, **fields: Any) -> dict[str, Any]:
    """Create subscription ``hook`` to ``receiver`` and give the receiver its secret."""
    body = {"endpoint": receiver.url, "batch_size": 10, "timeout_s": 2, "retry": FAST_RETRY, **fields}
    response = httpx.put(f"{queue_url}/v1/queues/{QUEUE}/subscriptions/hook", json=body, timeout=10)
    assert response.status_code == 201, response.text
    created = response.json()
    receiver.secrets.append(created["secret"])
    return dict(created)


def publish(queue_url: str, count: int, *, queue: str = QUEUE) -> list[str]:
    messages = [{"body": {"n": n}} for n in range(count)]
    response = httpx.post(f"{queue_url}/v1/queues/{queue}/messages", json={"messages": messages}, timeout=10)
    assert response.status_code == 200, response.text
    return [result["id"] for result in response.json()["results"]]


def queue_stats(queue_url: str, queue: str = QUEUE) -> dict[str, Any]:
    response = httpx.get(f"{queue_url}/v1/queues/{queue}", timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json()["stats"])


def subscription(queue_url: str) -> dict[str, Any]:
    response = httpx.get(f"{queue_url}/v1/queues/{QUEUE}/subscriptions/hook", timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_until(condition: Callable[[], bool], *, timeout_s: float = 15.0, description: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {description}")
        time.sleep(0.02)


def test_batches_are_signed_and_acked(start_push_queue: Callable[..., Any], receiver: WebhookReceiver) -> None:
    queue = start_push_queue(QUEUE_FSYNC="never")
    create_queue(queue.url)
    subscribe(queue.url, receiver, batch_size=10)
    ids = publish(queue.url, 25)

    wait_until(lambda: queue_stats(queue.url)["acked_total"] == 25, description="25 acks")
    assert sorted(receiver.delivered_ids()) == sorted(ids)
    assert all(d.signature_valid for d in receiver.deliveries)
    assert all(len(d.body["messages"]) <= 10 for d in receiver.deliveries)
    first = receiver.deliveries[0]
    assert first.body["queue"] == QUEUE
    assert first.body["subscription"] == "hook"
    assert first.body["messages"][0]["body"] == {"n": 0}
    assert first.headers[HEADER_SIGNATURE].startswith("v1,")
    assert abs(int(first.headers[HEADER_TIMESTAMP]) - time.time()) < 60

    stats = subscription(queue.url)["stats"]
    assert stats["messages_delivered"] == 25
    assert stats["attempts"]["delivered"] == len(receiver.deliveries)
    assert stats["backlog"] == 0


def test_signature_verifies_with_shown_secret_only(
    start_push_queue: Callable[..., Any], receiver: WebhookReceiver
) -> None:
    queue = start_push_queue(QUEUE_FSYNC="never")
    create_queue(queue.url, max_deliveries=10)
    created = subscribe(queue.url, receiver)
    publish(queue.url, 1)
    wait_until(lambda: len(receiver.deliveries) == 1, description="one delivery")
    assert receiver.deliveries[0].signature_valid
    assert created["secret"].startswith("whsec_")
    # The secret is shown once: GET never returns it.
    assert "secret" not in subscription(queue.url)

    # A receiver holding another secret rejects the next delivery with 401.
    receiver.secrets[:] = ["whsec_" + "QUJD" * 8]
    publish(queue.url, 1)
    wait_until(lambda: len(receiver.answered(401)) >= 1, description="a rejected signature")
    assert not receiver.answered(401)[0].signature_valid
    wait_until(
        lambda: subscription(queue.url)["stats"]["attempts"].get("rejected_status", 0) >= 1,
        description="the queue to count the 401",
    )
    assert queue_stats(queue.url)["acked_total"] == 1


def test_500s_are_retried_then_acked(start_push_queue: Callable[..., Any], receiver: WebhookReceiver) -> None:
    queue = start_push_queue(QUEUE_FSYNC="never")
    create_queue(queue.url, max_deliveries=10)
    receiver.script.extend([Answer(500), Answer(503)])
    subscribe(queue.url, receiver)
    [message_id] = publish(queue.url, 1)

    wait_until(lambda: queue_stats(queue.url)["acked_total"] == 1, description="the ack after two 5xx")
    assert [d.status for d in receiver.deliveries] == [500, 503, 200]
    assert [d.body["messages"][0]["deliveries"] for d in receiver.deliveries] == [1, 2, 3]
    assert receiver.delivered_ids() == [message_id]
    # A retried batch keeps its webhook-id, so receivers can recognise it.
    assert len({d.headers[HEADER_ID] for d in receiver.deliveries}) == 1
    stats = subscription(queue.url)["stats"]
    assert stats["attempts"] == {"retryable_status": 2, "delivered": 1}
    assert stats["consecutive_failures"] == 0


def test_timeout_is_retried(start_push_queue: Callable[..., Any], receiver: WebhookReceiver) -> None:
    queue = start_push_queue(QUEUE_FSYNC="never")
    create_queue(queue.url, max_deliveries=10)
    receiver.script.append(Answer(200, delay_s=1.5))
    subscribe(queue.url, receiver, timeout_s=0.3)
    publish(queue.url, 1)

    wait_until(lambda: queue_stats(queue.url)["acked_total"] == 1, description="the ack after a timeout")
    stats = subscription(queue.url)["stats"]
    assert stats["attempts"] == {"timeout": 1, "delivered": 1}
    assert [d.body["messages"][0]["deliveries"] for d in receiver.deliveries] == [1, 2]


def test_retry_after_delays_next_attempt(start_push_queue: Callable[..., Any], receiver: WebhookReceiver) -> None:
    queue = start_push_queue(QUEUE_FSYNC="never")
    create_queue(queue.url, max_deliveries=10)
    receiver.script.append(Answer(429, headers={"retry-after": "1"}))
    subscribe(queue.url, receiver)
    publish(queue.url, 1)

    wait_until(lambda: queue_stats(queue.url)["acked_total"] == 1, description="the ack after a 429")
    first, second = receiver.deliveries
    assert first.status == 429
    assert second.status == 200
    # Without Retry-After the backoff would be at most 0.02 s.
    assert second.received_at - first.received_at >= 0.95


def test_failures_dead_letter_after_max_deliveries(
    start_push_queue: Callable[..., Any], receiver: WebhookReceiver
) -> None:
    queue = start_push_queue(QUEUE_FSYNC="never")
    create_queue(queue.url, max_deliveries=3)
    receiver.default = Answer(500)
    subscribe(queue.url, receiver)
    [message_id] = publish(queue.url, 1)

    wait_until(lambda: queue_stats(queue.url, f"{QUEUE}.dlq")["ready"] == 1, description="a dead letter")
    assert len(receiver.deliveries) == 3
    assert queue_stats(queue.url)["ready"] == 0
    assert subscription(queue.url)["stats"]["messages_dead_lettered"] == 1

    leased = httpx.post(f"{queue.url}/v1/queues/{QUEUE}.dlq/leases", json={"max_messages": 1}, timeout=10).json()
    dead_letter = leased["messages"][0]["dead_letter"]
    assert dead_letter["id"] == message_id
    assert dead_letter["deliveries"] == 3
    assert "HTTP 500" in dead_letter["reason"]


def test_410_disables_subscription(start_push_queue: Callable[..., Any], receiver: WebhookReceiver) -> None:
    queue = start_push_queue(QUEUE_FSYNC="never")
    create_queue(queue.url)
    receiver.default = Answer(410)
    subscribe(queue.url, receiver)
    publish(queue.url, 3)

    wait_until(lambda: subscription(queue.url)["state"] == "disabled", description="the subscription to be disabled")
    time.sleep(0.3)
    assert len(receiver.deliveries) == 1
    described = subscription(queue.url)
    assert "410" in described["disabled_reason"]
    # The batch is ready at once for any other consumer.
    wait_until(lambda: queue_stats(queue.url)["ready"] == 3, description="the batch to be ready again")

    # A PUT enables the subscription again and delivery resumes.
    receiver.default = Answer(200)
    response = httpx.put(
        f"{queue.url}/v1/queues/{QUEUE}/subscriptions/hook", json={"endpoint": receiver.url}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "active"
    wait_until(lambda: queue_stats(queue.url)["acked_total"] == 3, description="delivery after re-enabling")


def test_pull_consumer_and_subscription_share_messages(
    start_push_queue: Callable[..., Any], receiver: WebhookReceiver
) -> None:
    queue = start_push_queue(QUEUE_FSYNC="never")
    create_queue(queue.url)
    receiver.default = Answer(200, delay_s=0.05)
    subscribe(queue.url, receiver, batch_size=5, max_concurrency=1)
    ids = publish(queue.url, 200)

    pulled: list[str] = []
    with httpx.Client(base_url=queue.url, timeout=10) as client:
        for _ in range(200):
            if queue_stats(queue.url)["acked_total"] == 200:
                break
            leased = client.post(f"/v1/queues/{QUEUE}/leases", json={"max_messages": 5}).json()["messages"]
            if leased:
                pulled += [m["id"] for m in leased]
                client.post(f"/v1/queues/{QUEUE}/acks", json={"receipts": [m["receipt"] for m in leased]})
            time.sleep(0.01)

    wait_until(lambda: queue_stats(queue.url)["acked_total"] == 200, description="200 acks")
    pushed = receiver.delivered_ids()
    assert pulled, "the pull consumer got no message"
    assert pushed, "the subscription got no message"
    assert set(pulled).isdisjoint(pushed)
    assert sorted(pulled + pushed) == sorted(ids)


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
def test_restart_delivers_backlog(
    start_push_queue: Callable[..., Any], receiver: WebhookReceiver, stop: str
) -> None:
    queue = start_push_queue()  # QUEUE_FSYNC=always: a SIGKILL loses nothing acknowledged.
    create_queue(queue.url, max_deliveries=1000)
    receiver.default = Answer(503)
    subscribe(queue.url, receiver, batch_size=7)
    ids = publish(queue.url, 50)
    wait_until(lambda: len(receiver.deliveries) >= 2, description="failing deliveries")

    if stop == "sigkill":
        queue.kill()
    else:
        assert queue.stop() == 0
    receiver.default = Answer(200)
    queue.start()

    assert subscription(queue.url)["endpoint"] == receiver.url
    wait_until(lambda: queue_stats(queue.url)["acked_total"] == 50, description="50 acks after the restart")
    delivered = receiver.delivered_ids()
    assert sorted(set(delivered)) == sorted(ids)
    assert all(count == 1 for count in Counter(delivered).values())
    stats = queue_stats(queue.url)
    assert stats["ready"] + stats["leased"] + stats["delayed"] == 0


def test_loopback_endpoint_without_allowlist_is_400(
    start_queue_server: Callable[..., Any], receiver: WebhookReceiver
) -> None:
    queue = start_queue_server(QUEUE_FSYNC="never")
    create_queue(queue.url)
    response = httpx.put(
        f"{queue.url}/v1/queues/{QUEUE}/subscriptions/hook", json={"endpoint": receiver.url}, timeout=10
    )
    assert response.status_code == 400
    assert "'127.0.0.1'" in response.json()["detail"]
    assert "QUEUE_PUSH_ALLOWED_NETWORKS" in response.json()["detail"]
