"""The service's use of the log: segment deletion, dedup keys across segments, recovery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from queue_server.service import QueueService, ServiceOptions
from queue_server.wal.log import list_segments

BODY = b'"' + b"x" * 500 + b'"'


async def open_service(data_dir: Path, *, dedup_window_s: float) -> QueueService:
    options = ServiceOptions(data_dir=data_dir, segment_bytes=4096, min_free_bytes=0, dedup_window_s=dedup_window_s)
    service = QueueService(options)
    service.open()
    await service.start()
    return service


async def publish_and_ack_all(service: QueueService, batches: int, *, keyed: bool) -> None:
    await service.put_queue("jobs", {})
    for number in range(batches):
        keys = [f"k{number}:0", f"k{number}:1"] if keyed else [None, None]
        await service.publish("jobs", [BODY, BODY], keys, [0.0, 0.0])
    leased = orjson.loads(await service.lease("jobs", 1000, 0, None))["messages"]
    results = await service.ack("jobs", [m["receipt"] for m in leased])
    assert all(status == "acked" for _, status in results)


def test_finished_segments_deleted_after_window(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        service = await open_service(tmp_path, dedup_window_s=0.2)
        await publish_and_ack_all(service, 20, keyed=True)
        before = len(list_segments(tmp_path))
        await asyncio.sleep(0.3)
        service._collect_segments()
        after = len(list_segments(tmp_path))
        await service.close()
        return before, after

    before, after = asyncio.run(scenario())
    assert before > 3
    assert after == 1


def test_segments_with_keys_in_window_kept(tmp_path: Path) -> None:
    async def scenario() -> None:
        service = await open_service(tmp_path, dedup_window_s=300)
        await publish_and_ack_all(service, 20, keyed=True)
        service._collect_segments()
        segments = len(list_segments(tmp_path))
        await service.close()
        assert segments > 3

        reopened = await open_service(tmp_path, dedup_window_s=300)
        try:
            results = await reopened.publish("jobs", [BODY], ["k3:1"], [0.0])
            assert results == [("4-1", True)]
            assert reopened.queue("jobs").live_messages == 0
        finally:
            await reopened.close()

    asyncio.run(scenario())


def test_unacked_messages_keep_their_segment(tmp_path: Path) -> None:
    async def scenario() -> None:
        service = await open_service(tmp_path, dedup_window_s=0.01)
        await service.put_queue("jobs", {})
        await service.publish("jobs", [b'"first"'], [None], [0.0])
        for _ in range(20):
            await service.publish("jobs", [BODY, BODY], [None, None], [0.0, 0.0])
        leased = orjson.loads(await service.lease("jobs", 1000, 0, None))["messages"]
        await service.ack("jobs", [m["receipt"] for m in leased if m["body"] != "first"])
        await asyncio.sleep(0.05)
        service._collect_segments()
        await service.close()

        reopened = await open_service(tmp_path, dedup_window_s=0.01)
        try:
            [message] = orjson.loads(await reopened.lease("jobs", 10, 0, None))["messages"]
            assert message["body"] == "first"
            assert message["deliveries"] == 2
        finally:
            await reopened.close()

    asyncio.run(scenario())


def test_dead_letter_copy_survives_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        service = await open_service(tmp_path, dedup_window_s=300)
        await service.put_queue("jobs", {})
        await service.publish("jobs", [b'{"bad":true}'], [None], [0.0])
        [message] = orjson.loads(await service.lease("jobs", 1, 0, None))["messages"]
        await service.nack("jobs", [message["receipt"]], delay_s=0, dead_letter=True, reason="bad")
        await service.close()

        reopened = await open_service(tmp_path, dedup_window_s=300)
        try:
            assert reopened.queue("jobs").live_messages == 0
            assert reopened.queue("jobs").totals.dead_lettered == 1
            [dead] = orjson.loads(await reopened.lease("jobs.dlq", 1, 0, None))["messages"]
            assert dead["body"] == {"bad": True}
            assert dead["dead_letter"] == {"queue": "jobs", "id": message["id"], "deliveries": 1, "reason": "bad"}
        finally:
            await reopened.close()

    asyncio.run(scenario())


def test_extension_records_replay_and_checkpoint(tmp_path: Path) -> None:
    from queue_server.service import Extension
    from queue_server.wal.records import RecordType, encode_json

    def make(service_state: dict) -> Extension:
        return Extension(
            handlers={RecordType.SUBSCRIPTION_PUT: lambda data: service_state.setdefault("puts", []).append(data)},
            checkpoint=lambda: {"count": len(service_state.get("puts", []))},
            restore=lambda stored: service_state.update(restored=stored),
        )

    async def scenario() -> tuple[dict, dict]:
        first_state: dict = {}
        service = QueueService(ServiceOptions(data_dir=tmp_path, min_free_bytes=0))
        service.register_extension("push", make(first_state))
        service.open()
        await service.start()
        await service.append_durable(encode_json(RecordType.SUBSCRIPTION_PUT, {"name": "hook"}))
        first_state["puts"] = [{"name": "hook"}]
        await service.close()

        second_state: dict = {}
        reopened = QueueService(ServiceOptions(data_dir=tmp_path, min_free_bytes=0))
        reopened.register_extension("push", make(second_state))
        reopened.open()
        await reopened.start()
        await reopened.close()
        return first_state, second_state

    _, second = asyncio.run(scenario())
    assert second["puts"] == [{"name": "hook"}]
    assert second["restored"] == {"count": 0}


def test_weaker_fsync_policies_keep_data_on_clean_stop(tmp_path: Path) -> None:
    from queue_server.wal.log import FsyncPolicy

    async def scenario(policy: FsyncPolicy, data_dir: Path) -> int:
        options = ServiceOptions(data_dir=data_dir, fsync=policy, fsync_interval_s=0.05, min_free_bytes=0)
        service = QueueService(options)
        service.open()
        await service.start()
        await service.put_queue("jobs", {})
        await service.publish("jobs", [b"1", b"2"], [None, None], [0.0, 0.0])
        await asyncio.sleep(0.2)
        await service.close()

        reopened = QueueService(options)
        reopened.open()
        count = reopened.queue("jobs").live_messages
        reopened.wal.close()
        return count

    for policy in (FsyncPolicy.INTERVAL, FsyncPolicy.NEVER):
        assert asyncio.run(scenario(policy, tmp_path / policy.value)) == 2, policy
