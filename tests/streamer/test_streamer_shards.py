"""Shard plans, control-queue message bodies, run ids and keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from streamer_test_support import write_dump

from streamer.dcgm_csv import read_header, read_rows, scan_records
from streamer.shards import (
    RunMessage,
    ShardMessage,
    new_run_id,
    plan_shards,
    row_key,
    row_key_prefix,
    source_name,
)


def test_scan_matches_read_rows_with_bad_rows(tmp_path: Path) -> None:
    path = write_dump(tmp_path / "dump.csv", hosts=1, gpus_per_host=2)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = b'"broken, "quote" here\n'
    lines[5] = b"\n"
    lines[7] = lines[7].replace(b'"nvidia', b'"\xff', 1)
    path.write_bytes(b"".join(lines))
    header = read_header(path)

    scanned = list(scan_records(path, header))

    assert scanned == [(row.line, row.start_offset, row.end_offset) for row in read_rows(path, header)]
    assert len(scanned) == 19


@pytest.mark.parametrize("rows_per_shard", [1, 7, 20, 1000], ids=["one", "seven", "exact", "larger-than-file"])
def test_plan_covers_every_row_once(tmp_path: Path, rows_per_shard: int) -> None:
    path = write_dump(tmp_path / "dump.csv", hosts=1, gpus_per_host=2)  # 20 rows
    header = read_header(path)

    plan = plan_shards(path, header, rows_per_shard=rows_per_shard)
    lines = [
        row.line
        for shard in plan
        for row in read_rows(
            path, header, start_offset=shard.start_offset, start_line=shard.start_line, end_offset=shard.end_offset
        )
    ]

    assert lines == list(range(2, 22))
    assert len(plan) == -(-20 // rows_per_shard)
    assert [shard.index for shard in plan] == list(range(len(plan)))


def test_plan_of_file_without_records(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("timestamp,metric_name,gpu_id,device,uuid,modelName,Hostname,value\n")

    assert plan_shards(path, read_header(path), rows_per_shard=10) == []


def shard_body(**overrides: Any) -> dict[str, Any]:
    message = ShardMessage(
        run_id="r", source="f.csv", file_size=10, shard_count=2, index=1, pass_index=3, passes=5,
        run_start=1000.0, interval_s=2.0, start_offset=5, end_offset=9, start_line=4,
    )
    return {**message.to_body(), **overrides}


def test_shard_message_round_trip() -> None:
    message = ShardMessage.from_body(shard_body())

    assert message.to_body() == shard_body()
    assert message.key == "shard:r:1:3"
    assert message.due_at == 1006.0
    assert message.next_pass().pass_index == 4
    assert message.next_pass().key == "shard:r:1:4"
    assert not message.is_last_pass
    assert message.next_pass().is_last_pass
    assert message.row_key(12) == "f.csv:r:3:12"


@pytest.mark.parametrize(
    "overrides",
    [
        {"kind": "run"},
        {"index": "1"},
        {"pass_index": True},
        {"start_offset": 10},
        {"pass_index": -1},
        {"interval_s": -1},
        {"run_start": float("nan")},
    ],
    ids=[
        "wrong-kind", "string-index", "bool-pass", "reversed-range", "negative-pass", "negative-interval", "nan-start"
    ],
)
def test_shard_message_rejects_invalid(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="shard message"):
        ShardMessage.from_body(shard_body(**overrides))


def test_shard_message_rejects_missing_field() -> None:
    body = shard_body()
    del body["run_id"]

    with pytest.raises(ValueError, match="lacks the field 'run_id'"):
        ShardMessage.from_body(body)


def test_run_message_makes_pass_zero() -> None:
    run = RunMessage(
        run_id="r", source="f.csv", file_size=10, passes=2, run_start=5.0, interval_s=1.0, shards=[[1, 4, 2], [4, 9, 3]]
    )

    shards = RunMessage.from_body(run.to_body()).shard_messages()

    assert [(s.index, s.start_offset, s.end_offset, s.start_line) for s in shards] == [(0, 1, 4, 2), (1, 4, 9, 3)]
    assert {s.pass_index for s in shards} == {0}
    assert {s.shard_count for s in shards} == {2}


def test_run_message_rejects_bad_plan() -> None:
    body = RunMessage(
        run_id="r", source="f.csv", file_size=10, passes=2, run_start=5.0, interval_s=1.0, shards=[[1, 4]]
    ).to_body()

    with pytest.raises(ValueError, match="'shards' is invalid"):
        RunMessage.from_body(body)


def test_run_ids_unique_and_dated() -> None:
    ids = {new_run_id(0.0) for _ in range(100)}

    assert len(ids) == 100
    assert all(run_id.startswith("19700101T000000Z-") for run_id in ids)


def test_source_name_shortens_long_names() -> None:
    long_name = source_name(Path("/data") / ("x" * 200 + ".csv"))

    assert source_name(Path("/data/dump.csv")) == "dump.csv"
    assert len(long_name) == 80
    assert long_name != source_name(Path("/data") / ("x" * 201 + ".csv"))
    assert row_key("dump.csv", "r", 2, 7) == "dump.csv:r:2:7"


def test_row_key_prefix_plus_line_is_row_key() -> None:
    message = ShardMessage.from_body(shard_body(source="f.csv", run_id="r", pass_index=3))

    assert message.row_key_prefix + "12" == message.row_key(12)
    assert row_key_prefix("dump.csv", "r", 2) + "7" == row_key("dump.csv", "r", 2, 7)
