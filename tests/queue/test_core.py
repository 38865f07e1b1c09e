"""The queue core without I/O: lease state machine, fencing, delays, dead-lettering, dedup."""

from __future__ import annotations

from array import array

import pytest

from queue_server.core.batch import Batch
from queue_server.core.broker import Broker, key_hash
from queue_server.core.states import MessageState, Transition, next_state
from queue_server.errors import IllegalTransition, InvalidRequest, QueueFull, QueueNotFound

NOW = 1_000_000.0


def publish(broker: Broker, queue: str, bodies: list[bytes], *, keys=None, delays=None, now=NOW) -> list[tuple[str, bool]]:
    """Publish through the broker the way the service does, with an in-memory location."""
    keys = keys or [None] * len(bodies)
    delays = delays or [0.0] * len(bodies)
    plan = broker.prepare_publish(queue, [len(b) for b in bodies], keys, delays, now)
    if plan.stored:
        offsets = array("I", [0])
        for position in plan.stored:
            offsets.append(offsets[-1] + len(bodies[position]))
        batch = Batch(plan.seq, now, offsets, ("memory", plan.seq), delayed=frozenset(plan.dues))
        broker.commit_publish(plan, batch)
    return plan.results


@pytest.fixture
def broker() -> Broker:
    broker = Broker(epoch=7)
    broker.put_queue("jobs", {"visibility_timeout_s": 10, "max_deliveries": 2})
    return broker


@pytest.mark.parametrize(
    ("state", "transition", "expected"),
    [
        (MessageState.READY, Transition.LEASE, MessageState.LEASED),
        (MessageState.LEASED, Transition.ACK, MessageState.ACKED),
        (MessageState.LEASED, Transition.EXPIRE, MessageState.READY),
        (MessageState.LEASED, Transition.DEFER, MessageState.DELAYED),
        (MessageState.DELAYED, Transition.DUE, MessageState.READY),
        (MessageState.LEASED, Transition.MOVE, MessageState.MOVED),
        (MessageState.READY, Transition.DROP, MessageState.DROPPED),
    ],
    ids=["lease", "ack", "expire", "defer", "due", "move", "drop"],
)
def test_state_machine_allowed_moves(state, transition, expected) -> None:
    assert next_state(state, transition) is expected


@pytest.mark.parametrize(
    ("state", "transition"),
    [
        (MessageState.LEASED, Transition.LEASE),
        (MessageState.ACKED, Transition.ACK),
        (MessageState.READY, Transition.EXPIRE),
        (MessageState.MOVED, Transition.NACK),
        (MessageState.DROPPED, Transition.DUE),
    ],
    ids=["lease-twice", "ack-twice", "expire-ready", "nack-moved", "due-dropped"],
)
def test_state_machine_illegal_moves(state, transition) -> None:
    with pytest.raises(IllegalTransition, match=transition.value):
        next_state(state, transition)


def test_lease_ack_removes_message(broker: Broker) -> None:
    publish(broker, "jobs", [b"1", b"2"])
    leased, transfers = broker.lease("jobs", 10, None, NOW)
    outcome = broker.ack("jobs", [m.receipt for m in leased])
    queue = broker.queue("jobs")
    assert [m.message_id for m in leased] == ["1-0", "1-1"]
    assert transfers == []
    assert [status for _, status in outcome.results] == ["acked", "acked"]
    assert queue.live_messages == 0
    assert queue.batches == {}
    assert queue.totals.acked == 2


def test_lease_respects_max_messages(broker: Broker) -> None:
    publish(broker, "jobs", [b"1", b"2", b"3"])
    first, _ = broker.lease("jobs", 2, None, NOW)
    second, _ = broker.lease("jobs", 2, None, NOW)
    assert len(first) == 2
    assert len(second) == 1
    assert broker.queue("jobs").leased == 3


def test_expired_lease_redelivers_and_fences_old_receipt(broker: Broker) -> None:
    publish(broker, "jobs", [b"x"])
    first, _ = broker.lease("jobs", 1, None, NOW)
    broker.tick(NOW + 11)
    second, _ = broker.lease("jobs", 1, None, NOW + 11)
    old = broker.ack("jobs", [first[0].receipt])
    extend_old = broker.extend("jobs", [first[0].receipt], 30, NOW + 11)
    new = broker.ack("jobs", [second[0].receipt])
    assert second[0].deliveries == 2
    assert old.results[0][1] == "stale"
    assert extend_old.results[0][1] == "stale"
    assert new.results[0][1] == "acked"
    assert broker.queue("jobs").totals.redelivered == 1


def test_receipt_from_earlier_epoch_is_stale(broker: Broker) -> None:
    publish(broker, "jobs", [b"x"])
    leased, _ = broker.lease("jobs", 1, None, NOW)
    broker.epoch += 1
    assert broker.ack("jobs", [leased[0].receipt]).results[0][1] == "stale"


@pytest.mark.parametrize("receipt", ["", "abc", "1-2-3", "1-x-1-1", 42, None], ids=["empty", "word", "short", "letter", "int", "null"])
def test_unparsable_receipt_is_invalid(broker: Broker, receipt) -> None:
    assert broker.ack("jobs", [receipt]).results[0][1] == "invalid"


def test_acked_receipt_is_not_found_afterwards(broker: Broker) -> None:
    publish(broker, "jobs", [b"x", b"y"])
    leased, _ = broker.lease("jobs", 2, None, NOW)
    broker.ack("jobs", [leased[0].receipt])
    assert broker.ack("jobs", [leased[0].receipt]).results[0][1] == "not_found"


def test_extend_keeps_lease_past_timeout(broker: Broker) -> None:
    publish(broker, "jobs", [b"x"])
    leased, _ = broker.lease("jobs", 1, None, NOW)
    outcome = broker.extend("jobs", [leased[0].receipt], 60, NOW + 5)
    broker.tick(NOW + 30)
    assert outcome.results[0][1] == "extended"
    assert broker.queue("jobs").leased == 1
    assert broker.lease("jobs", 1, None, NOW + 30)[0] == []


def test_expired_lease_not_leased_again_can_be_acked(broker: Broker) -> None:
    publish(broker, "jobs", [b"x"])
    leased, _ = broker.lease("jobs", 1, None, NOW)
    broker.tick(NOW + 11)
    assert broker.queue("jobs").ready == 1
    assert broker.ack("jobs", [leased[0].receipt]).results[0][1] == "acked"


def test_nack_with_delay_hides_message_until_due(broker: Broker) -> None:
    publish(broker, "jobs", [b"x"])
    leased, _ = broker.lease("jobs", 1, None, NOW)
    outcome = broker.nack("jobs", [leased[0].receipt], delay_s=5, dead_letter=False, reason=None, now=NOW)
    assert outcome.results[0][1] == "nacked"
    assert broker.queue("jobs").delayed == 1
    assert broker.lease("jobs", 1, None, NOW + 4)[0] == []
    broker.tick(NOW + 5)
    again, _ = broker.lease("jobs", 1, None, NOW + 5)
    assert again[0].deliveries == 2


def test_delayed_publish_not_leased_before_due(broker: Broker) -> None:
    publish(broker, "jobs", [b"late", b"now"], delays=[30.0, 0.0])
    first, _ = broker.lease("jobs", 10, 100, NOW)
    broker.tick(NOW + 29)
    early, _ = broker.lease("jobs", 10, None, NOW + 29)
    broker.tick(NOW + 30)
    due, _ = broker.lease("jobs", 10, None, NOW + 30)
    assert [m.message_id for m in first] == ["1-1"]
    assert early == []
    assert [m.message_id for m in due] == ["1-0"]


def test_max_deliveries_dead_letters_with_count(broker: Broker) -> None:
    publish(broker, "jobs", [b"poison"])
    for attempt in range(2):
        broker.tick(NOW + attempt * 20)
        leased, _ = broker.lease("jobs", 1, None, NOW + attempt * 20)
        assert leased[0].deliveries == attempt + 1
    transfers = broker.tick(NOW + 40)
    assert len(transfers) == 1
    transfer = transfers[0]
    assert (transfer.source, transfer.target, transfer.kind) == ("jobs", "jobs.dlq", "dead_letter")
    assert transfer.origins[0].deliveries == 2
    assert transfer.origins[0].reason == "max_deliveries"
    assert broker.queue("jobs").live_messages == 0
    assert broker.queue("jobs").totals.dead_lettered == 1


def test_nack_dead_letter_carries_reason(broker: Broker) -> None:
    publish(broker, "jobs", [b"bad"])
    leased, _ = broker.lease("jobs", 1, None, NOW)
    outcome = broker.nack("jobs", [leased[0].receipt], delay_s=0, dead_letter=True, reason="invalid_json", now=NOW)
    assert outcome.results[0][1] == "dead_lettered"
    assert outcome.transfers[0].origins[0].reason == "invalid_json"


def test_nack_dead_letter_without_dead_letter_queue_rejected() -> None:
    broker = Broker()
    broker.put_queue("plain", {"dead_letter_queue": None})
    publish(broker, "plain", [b"x"])
    leased, _ = broker.lease("plain", 1, None, NOW)
    with pytest.raises(InvalidRequest, match="no dead-letter queue"):
        broker.nack("plain", [leased[0].receipt], delay_s=0, dead_letter=True, reason=None, now=NOW)
    assert broker.queue("plain").leased == 1


def test_redrive_returns_messages_to_source(broker: Broker) -> None:
    publish(broker, "jobs", [b"bad"])
    leased, _ = broker.lease("jobs", 1, None, NOW)
    transfer = broker.nack("jobs", [leased[0].receipt], delay_s=0, dead_letter=True, reason="r", now=NOW).transfers[0]
    dead_batch = Batch(transfer.seq, NOW, array("I", [0, 3]), ("memory", transfer.seq), origins=transfer.origins)
    broker.commit_transfer(transfer, dead_batch)
    redriven = broker.redrive("jobs.dlq", None)
    assert [(t.source, t.target, t.kind, len(t.slots)) for t in redriven] == [("jobs.dlq", "jobs", "redrive", 1)]
    assert broker.queue("jobs.dlq").live_messages == 0


def test_dedup_key_returns_first_id(broker: Broker) -> None:
    first = publish(broker, "jobs", [b"a", b"b"], keys=["k1", "k1"])
    again = publish(broker, "jobs", [b"c"], keys=["k1"], now=NOW + 299)
    later = publish(broker, "jobs", [b"d"], keys=["k1"], now=NOW + 301)
    assert first == [("1-0", False), ("1-0", True)]
    assert again == [("1-0", True)]
    assert later[0][1] is False
    assert broker.queue("jobs").totals.published == 2


def test_replayed_keys_dedup_within_window() -> None:
    broker = Broker()
    broker.put_queue("jobs", {})
    batch = Batch(5, NOW, array("I", [0, 1]), ("memory", 5))
    broker.replay_publish("jobs", batch, [0], [key_hash("jobs", "k1")], {}, NOW + 10)
    assert publish(broker, "jobs", [b"a"], keys=["k1"], now=NOW + 10) == [("5-0", True)]
    assert broker.next_seq == 6


def test_replayed_keys_past_window_forgotten() -> None:
    broker = Broker()
    broker.put_queue("jobs", {})
    batch = Batch(5, NOW, array("I", [0, 1]), ("memory", 5))
    broker.replay_publish("jobs", batch, [0], [key_hash("jobs", "k1")], {}, NOW + 301)
    assert publish(broker, "jobs", [b"a"], keys=["k1"], now=NOW + 301) == [("6-0", False)]


def test_checkpoint_restores_configs_and_totals(broker: Broker) -> None:
    publish(broker, "jobs", [b"a"])
    restored = Broker()
    restored.restore(broker.checkpoint())
    assert restored.queue("jobs").config.max_deliveries == 2
    assert restored.queue("jobs").totals.published == 1
    assert restored.next_seq == 2
    assert restored.epoch == 7


@pytest.mark.parametrize(
    ("config", "bodies", "match"),
    [({"max_messages": 2}, [b"1", b"2", b"3"], "max_messages"), ({"max_bytes": 5}, [b"123", b"456"], "max_bytes")],
    ids=["messages", "bytes"],
)
def test_limits_reject_without_state_change(config, bodies, match) -> None:
    broker = Broker()
    broker.put_queue("small", config)
    with pytest.raises(QueueFull, match=match):
        publish(broker, "small", bodies)
    assert broker.queue("small").live_messages == 0
    assert broker.next_seq == 1


def test_unknown_queue_raises_not_found(broker: Broker) -> None:
    with pytest.raises(QueueNotFound, match="'nope'"):
        broker.lease("nope", 1, None, NOW)


def test_put_queue_creates_dead_letter_queue(broker: Broker) -> None:
    config, created = broker.put_queue("other", {})
    assert created == ["other", "other.dlq"]
    assert config.dead_letter_queue == "other.dlq"
    assert broker.queue("other.dlq").config.dead_letter_queue is None


def test_put_queue_update_keeps_omitted_fields(broker: Broker) -> None:
    config, created = broker.put_queue("jobs", {"max_messages": 10})
    assert created == []
    assert config.visibility_timeout_s == 10
    assert config.max_messages == 10


@pytest.mark.parametrize(
    "fields",
    [{"visibility_timeout_s": 0}, {"visibility_timeout_s": 50_000}, {"max_deliveries": "3"}, {"colour": 1}, {"dead_letter_queue": "bad name"}],
    ids=["zero-timeout", "huge-timeout", "string-int", "unknown", "bad-dlq-name"],
)
def test_put_queue_rejects_bad_fields(broker: Broker, fields) -> None:
    with pytest.raises(InvalidRequest):
        broker.put_queue("jobs", fields)
    assert broker.queue("jobs").config.visibility_timeout_s == 10


def test_delete_queue_finishes_batches() -> None:
    finished = []
    broker = Broker(on_batch_finished=finished.append)
    broker.put_queue("jobs", {})
    publish(broker, "jobs", [b"1"])
    broker.delete_queue("jobs")
    assert [batch.seq for batch in finished] == [1]
    assert "jobs" not in broker.queues
    assert broker.queue("jobs.dlq").config.dead_letter_queue is None


def test_retention_drops_old_messages(broker: Broker) -> None:
    broker.put_queue("jobs", {"retention_s": 60})
    publish(broker, "jobs", [b"old"], now=NOW)
    publish(broker, "jobs", [b"new"], now=NOW + 50)
    assert broker.apply_retention(NOW + 61) == 1
    assert broker.queue("jobs").live_messages == 1


def test_oldest_ready_age_tracks_redelivery(broker: Broker) -> None:
    publish(broker, "jobs", [b"a"], now=NOW)
    publish(broker, "jobs", [b"b"], now=NOW + 5)
    queue = broker.queue("jobs")
    assert queue.oldest_ready_published_at() == NOW
    broker.lease("jobs", 1, None, NOW + 6)
    assert queue.oldest_ready_published_at() == NOW + 5
    broker.tick(NOW + 20)
    assert queue.oldest_ready_published_at() == NOW


def test_redrive_respects_max_messages(broker: Broker) -> None:
    publish(broker, "jobs", [b"a", b"b"])
    leased, _ = broker.lease("jobs", 2, None, NOW)
    receipts = [m.receipt for m in leased]
    transfer = broker.nack("jobs", receipts, delay_s=0, dead_letter=True, reason="r", now=NOW).transfers[0]
    dead_batch = Batch(transfer.seq, NOW, array("I", [0, 1, 2]), ("memory", transfer.seq), origins=transfer.origins)
    broker.commit_transfer(transfer, dead_batch)
    [redriven] = broker.redrive("jobs.dlq", 1)
    assert len(redriven.slots) == 1
    assert broker.queue("jobs.dlq").ready == 1


def test_repeated_ack_receipt_acks_once(broker: Broker) -> None:
    publish(broker, "jobs", [b"x", b"y"])
    leased, _ = broker.lease("jobs", 2, None, NOW)
    first, second = leased[0].receipt, leased[1].receipt

    outcome = broker.ack("jobs", [first, first, second, first])

    assert [status for _, status in outcome.results] == ["acked", "not_found", "acked", "not_found"]
    assert len(outcome.keys) == 2, "each message is logged as acked once"
    queue = broker.queue("jobs")
    assert (queue.live_messages, queue.totals.acked, queue.live_bytes) == (0, 2, 0)


def test_repeated_dead_letter_receipt_moves_once(broker: Broker) -> None:
    publish(broker, "jobs", [b"x", b"y"])
    leased, _ = broker.lease("jobs", 2, None, NOW)
    first = leased[0].receipt

    outcome = broker.nack("jobs", [first, first], delay_s=0, dead_letter=True, reason="bad", now=NOW)

    assert [status for _, status in outcome.results] == ["dead_lettered", "not_found"]
    assert [len(transfer.slots) for transfer in outcome.transfers] == [1]
    assert broker.queue("jobs").live_messages == 1


@pytest.mark.parametrize("delay_s", [0.0, 30.0], ids=["ready", "delayed"])
def test_repeated_nack_receipt_applies_again(broker: Broker, delay_s: float) -> None:
    publish(broker, "jobs", [b"x"])
    leased, _ = broker.lease("jobs", 1, None, NOW)
    receipt = leased[0].receipt

    extended = broker.extend("jobs", [receipt, receipt], 60, NOW)
    nacked = broker.nack("jobs", [receipt, receipt], delay_s=delay_s, dead_letter=False, reason=None, now=NOW)

    assert [status for _, status in extended.results] == ["extended", "extended"]
    assert [status for _, status in nacked.results] == ["nacked", "nacked"]
    queue = broker.queue("jobs")
    assert (queue.ready, queue.delayed, queue.leased) == ((0, 1, 0) if delay_s else (1, 0, 0))
    if not delay_s:
        assert len(broker.lease("jobs", 10, None, NOW)[0]) == 1, "a repeated nack makes the message ready once"


def test_ack_of_delayed_and_ready_messages_keeps_counts(broker: Broker) -> None:
    publish(broker, "jobs", [b"ab", b"cde", b"f"])
    leased, _ = broker.lease("jobs", 3, None, NOW)
    broker.nack("jobs", [leased[0].receipt], delay_s=30, dead_letter=False, reason=None, now=NOW)
    broker.nack("jobs", [leased[1].receipt], delay_s=0, dead_letter=False, reason=None, now=NOW)

    outcome = broker.ack("jobs", [message.receipt for message in leased])

    assert [status for _, status in outcome.results] == ["acked"] * 3
    queue = broker.queue("jobs")
    assert (queue.ready, queue.delayed, queue.leased, queue.live_bytes) == (0, 0, 0, 0)
    assert broker.tick(NOW + 60) == []
    assert queue.ready == 0, "an acked message does not come due"
    assert broker.lease("jobs", 10, None, NOW + 60)[0] == [], "an acked message is not leased from the retry list"


@pytest.mark.parametrize("path", ["nack-twice", "expire-then-nack", "nack-delay-due"])
def test_message_made_ready_twice_is_leased_once(broker: Broker, path: str) -> None:
    publish(broker, "jobs", [b"x"])
    leased, _ = broker.lease("jobs", 1, None, NOW)
    receipt = leased[0].receipt
    now = NOW
    if path == "nack-twice":
        broker.nack("jobs", [receipt], delay_s=0, dead_letter=False, reason=None, now=now)
        broker.nack("jobs", [receipt], delay_s=0, dead_letter=False, reason=None, now=now)
    elif path == "expire-then-nack":
        now = NOW + 11
        broker.tick(now)
        broker.nack("jobs", [receipt], delay_s=0, dead_letter=False, reason=None, now=now)
    else:
        broker.nack("jobs", [receipt], delay_s=0, dead_letter=False, reason=None, now=now)
        broker.nack("jobs", [receipt], delay_s=5, dead_letter=False, reason=None, now=now)
        now = NOW + 6
        broker.tick(now)
    assert broker.queue("jobs").ready == 1

    again, _ = broker.lease("jobs", 10, None, now)

    assert [message.message_id for message in again] == ["1-0"]
    assert broker.queue("jobs").leased == 1
