"""Shards of a CSV dump, the shard messages on the control queue, and the pass schedule.

A shard is a run of consecutive records of the file, given as a byte range that
starts and ends on record boundaries, so a streamer can seek straight to it. The
plan is made once per run by the streamers that create the run, and it travels in
the shard messages. Streamers that join later never scan the file.

Nothing in this module talks to the queue.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamer.dcgm_csv import CsvHeader, scan_records

__all__ = [
    "SHARD_KIND",
    "RUN_KIND",
    "ShardRange",
    "ShardMessage",
    "RunMessage",
    "new_run_id",
    "plan_shards",
    "source_name",
    "run_key",
    "row_key",
    "row_key_prefix",
]

#: ``kind`` of a control-queue body that describes one shard for one pass.
SHARD_KIND = "shard"
#: ``kind`` of the control-queue body that creates a run: the plan from which pass 0's shard messages are made.
RUN_KIND = "run"

_MAX_SOURCE_LENGTH = 80


@dataclass(frozen=True, slots=True)
class ShardRange:
    """Records ``[start_offset, end_offset)`` of the file; ``start_line`` is the line at ``start_offset``."""

    index: int
    start_offset: int
    end_offset: int
    start_line: int


@dataclass(frozen=True, slots=True)
class ShardMessage:
    """Body of a shard message: which rows to publish, for which pass of which run.

    ``run_start`` is a Unix time in seconds; pass ``k`` is due at
    ``run_start + k * interval_s``. ``passes`` is the number of passes of the run,
    0 for no end. ``file_size`` lets a streamer check that its copy of the file is
    the one the plan was made from.
    """

    run_id: str
    source: str
    file_size: int
    shard_count: int
    index: int
    pass_index: int
    passes: int
    run_start: float
    interval_s: float
    start_offset: int
    end_offset: int
    start_line: int
    kind: str = SHARD_KIND

    @property
    def key(self) -> str:
        """Idempotency key of this message: one per (run, shard, pass)."""
        return f"shard:{self.run_id}:{self.index}:{self.pass_index}"

    @property
    def due_at(self) -> float:
        """Unix time at which this pass is scheduled to start."""
        return self.run_start + self.pass_index * self.interval_s

    @property
    def is_last_pass(self) -> bool:
        return self.passes > 0 and self.pass_index + 1 >= self.passes

    def next_pass(self) -> ShardMessage:
        return replace(self, pass_index=self.pass_index + 1)

    def row_key(self, line: int) -> str:
        return row_key(self.source, self.run_id, self.pass_index, line)

    @property
    def row_key_prefix(self) -> str:
        """The part of every row key of this pass that comes before the line number."""
        return row_key_prefix(self.source, self.run_id, self.pass_index)

    def to_body(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_body(cls, body: Any) -> ShardMessage:
        """Validate a decoded control-queue body; raise ``ValueError`` naming the bad field."""
        if not isinstance(body, Mapping) or body.get("kind") != SHARD_KIND:
            raise ValueError(f"expected a shard message body with kind {SHARD_KIND!r}, got {body!r:.200}")
        try:
            message = cls(
                run_id=_typed(body, "run_id", str),
                source=_typed(body, "source", str),
                file_size=_typed(body, "file_size", int),
                shard_count=_typed(body, "shard_count", int),
                index=_typed(body, "index", int),
                pass_index=_typed(body, "pass_index", int),
                passes=_typed(body, "passes", int),
                run_start=float(_typed(body, "run_start", (int, float))),
                interval_s=float(_typed(body, "interval_s", (int, float))),
                start_offset=_typed(body, "start_offset", int),
                end_offset=_typed(body, "end_offset", int),
                start_line=_typed(body, "start_line", int),
            )
        except KeyError as exc:
            raise ValueError(f"shard message body lacks the field {exc.args[0]!r}: {body!r:.200}") from exc
        if not 0 <= message.start_offset <= message.end_offset or message.pass_index < 0:
            raise ValueError(f"shard message body has an invalid range or pass: {body!r:.200}")
        if not math.isfinite(message.run_start) or message.interval_s < 0:
            raise ValueError(f"shard message body has an invalid schedule: {body!r:.200}")
        return message


@dataclass(frozen=True, slots=True)
class RunMessage:
    """Body of a run-creation message: the run's id, schedule and shard plan.

    ``shards`` lists ``[start_offset, end_offset, start_line]`` per shard, in order.
    The streamer that leases this message publishes pass 0's shard messages from it.
    """

    run_id: str
    source: str
    file_size: int
    passes: int
    run_start: float
    interval_s: float
    shards: list[list[int]]
    kind: str = RUN_KIND

    def shard_messages(self) -> list[ShardMessage]:
        """Return the shard messages of pass 0."""
        return [
            ShardMessage(
                run_id=self.run_id,
                source=self.source,
                file_size=self.file_size,
                shard_count=len(self.shards),
                index=index,
                pass_index=0,
                passes=self.passes,
                run_start=self.run_start,
                interval_s=self.interval_s,
                start_offset=start_offset,
                end_offset=end_offset,
                start_line=start_line,
            )
            for index, (start_offset, end_offset, start_line) in enumerate(self.shards)
        ]

    def to_body(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_body(cls, body: Any) -> RunMessage:
        """Validate a decoded control-queue body; raise ``ValueError`` naming the bad field."""
        if not isinstance(body, Mapping) or body.get("kind") != RUN_KIND:
            raise ValueError(f"expected a run message body with kind {RUN_KIND!r}, got {body!r:.200}")
        try:
            shards = _typed(body, "shards", list)
            if not all(
                isinstance(shard, list) and len(shard) == 3 and all(type(n) is int for n in shard)
                for shard in shards
            ):
                raise ValueError(f"run message field 'shards' is invalid: {shards!r:.200}")
            return cls(
                run_id=_typed(body, "run_id", str),
                source=_typed(body, "source", str),
                file_size=_typed(body, "file_size", int),
                passes=_typed(body, "passes", int),
                run_start=float(_typed(body, "run_start", (int, float))),
                interval_s=float(_typed(body, "interval_s", (int, float))),
                shards=shards,
            )
        except KeyError as exc:
            raise ValueError(f"run message body lacks the field {exc.args[0]!r}: {body!r:.200}") from exc


def _typed(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"shard message field {name!r} has the invalid value {value!r}")
    return value


def plan_shards(path: Path, header: CsvHeader, *, rows_per_shard: int) -> list[ShardRange]:
    """Cut the file into shards of ``rows_per_shard`` records by reading it once.

    Rejected records count as records, so every line belongs to exactly one shard.
    A file without records gives an empty plan.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard!r}")
    shards: list[ShardRange] = []
    first: tuple[int, int, int] | None = None
    last_end = 0
    count = 0
    for line, start_offset, end_offset in scan_records(path, header):
        if first is None:
            first = (line, start_offset, end_offset)
        last_end = end_offset
        count += 1
        if count == rows_per_shard:
            shards.append(ShardRange(len(shards), first[1], end_offset, first[0]))
            first, count = None, 0
    if first is not None:
        shards.append(ShardRange(len(shards), first[1], last_end, first[0]))
    return shards


def source_name(path: Path) -> str:
    """Return the file name used in idempotency keys, shortened with a hash when long."""
    name = path.name
    if len(name) <= _MAX_SOURCE_LENGTH:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{name[:_MAX_SOURCE_LENGTH - 13]}~{digest}"


def new_run_id(now: float) -> str:
    """Return a new run id: the UTC start time and random digits, unique across restarts and data wipes."""
    moment = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{moment}-{secrets.token_hex(4)}"


def run_key(source: str, file_size: int, attempt: int) -> str:
    """Idempotency key of a run-creation message for one file.

    ``attempt`` counts keys already taken by finished runs that the queue's
    deduplication window still remembers.
    """
    return f"run:{source}:{file_size}:{attempt}"


def row_key(source: str, run_id: str, pass_index: int, line: int) -> str:
    """Idempotency key of one row in one pass of one run."""
    return f"{row_key_prefix(source, run_id, pass_index)}{line}"


def row_key_prefix(source: str, run_id: str, pass_index: int) -> str:
    """Return the part of a row key before the line number, so that a batch builds its keys by appending lines."""
    return f"{source}:{run_id}:{pass_index}:"
