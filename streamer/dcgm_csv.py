"""Streaming reader of DCGM exporter CSV dumps.

The dump has a header row and one quoted record per metric sample::

    timestamp,metric_name,gpu_id,device,uuid,modelName,Hostname,container,pod,namespace,value,labels_raw

Columns are found by header name, so their order does not matter. The file is read
as bytes, one physical line at a time, and fed to the ``csv`` module, so memory use
does not grow with the file. Reading can start at any record boundary given as a
byte offset, which is how a streamer reads one shard of a large file without
reading what comes before it.

A valid record becomes a ``ParsedRow`` that carries the message body the way
``TelemetryRecord.to_body()`` writes it. The body is built and checked against the
``TelemetryRecord`` field constraints by hand, because constructing and dumping a
pydantic model per row cost more than everything else the streamer does per row;
pydantic still produces the message of an ``invalid_field`` rejection. A record that
cannot become a ``TelemetryRecord`` is returned as a ``RejectedRow`` with a short,
bounded ``reason`` (fit for a metric label) and its line number.
"""

from __future__ import annotations

import collections
import csv
import functools
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from pydantic import ValidationError

from telemetry.record import TelemetryRecord, format_timestamp

__all__ = [
    "EXPORTER_COLUMNS",
    "CsvFormatError",
    "CsvHeader",
    "ParsedRow",
    "RejectedRow",
    "REJECT_REASONS",
    "RowCache",
    "parse_labels",
    "read_header",
    "read_rows",
    "scan_records",
]

#: Header of a dump, in the order the DCGM exporter writes the columns.
EXPORTER_COLUMNS = (
    "timestamp",
    "metric_name",
    "gpu_id",
    "device",
    "uuid",
    "modelName",
    "Hostname",
    "container",
    "pod",
    "namespace",
    "value",
    "labels_raw",
)

#: Columns every dump must have (header names as the DCGM exporter writes them).
REQUIRED_COLUMNS = (
    "timestamp",
    "metric_name",
    "gpu_id",
    "device",
    "uuid",
    "modelName",
    "Hostname",
    "value",
)

# Required columns whose value may still be empty in a row. The optional columns
# container, pod, namespace and labels_raw may be empty or absent from the header.
_MAY_BE_EMPTY = ("device", "modelName")

#: Every reason a row can be rejected for. The set is fixed so metric labels stay bounded.
REJECT_REASONS = (
    "column_count",
    "invalid_utf8",
    "missing_field",
    "invalid_gpu_id",
    "invalid_timestamp",
    "invalid_value",
    "non_finite_value",
    "invalid_labels",
    "invalid_field",
)

_BOM = b"\xef\xbb\xbf"

# One Prometheus-style label: name="value", where the value may contain \" and \\ escapes.
# The value is written as runs of plain characters between escapes, which the
# regex engine matches several times faster than one alternation per character.
_LABEL_PATTERN = r'\s*([A-Za-z_][A-Za-z0-9_.:-]*)\s*=\s*"([^"\\]*(?:\\.[^"\\]*)*)"\s*(?:,|$)'
_LABEL = re.compile(_LABEL_PATTERN, re.S)
# A whole labels_raw text: any number of labels. The closing quote of a value is
# its first unescaped quote, so at each position at most one label matches, and
# ``findall`` on a text this accepts returns exactly the labels a match-by-match
# walk returns.
_LABELS = re.compile(f"(?:{_LABEL_PATTERN})*", re.S)
_LABEL_ESCAPE = re.compile(r"\\(.)", re.S)
_LABEL_UNESCAPED = {"n": "\n", "\\": "\\", '"': '"'}


class CsvFormatError(ValueError):
    """The file is missing, empty, or its header lacks a required column."""


@dataclass(frozen=True, slots=True)
class CsvHeader:
    """Column positions of a dump and the byte offset where its first record starts."""

    columns: dict[str, int]
    width: int
    data_offset: int


@dataclass(frozen=True, slots=True)
class ParsedRow:
    """A valid record and where it sits in the file.

    ``body`` is the record as ``TelemetryRecord.to_body()`` writes it, with the CSV
    timestamp as its ``timestamp`` and the placeholder key ``"unpublished"``. The
    streamer publishes a copy with both replaced (see ``message_body``); nothing
    may change ``body`` itself, because the copies share its ``labels`` dict.
    ``line`` is the physical line (1-based, the header is line 1) where the record
    starts. ``start_offset`` and ``end_offset`` are the byte offsets of its first
    byte and of the byte just past it.
    """

    line: int
    start_offset: int
    end_offset: int
    body: dict[str, Any]
    #: ``body`` encoded once, split around its timestamp and key: see ``message_json``.
    _encoded: list[bytes] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def record(self) -> TelemetryRecord:
        """The record as a validated ``TelemetryRecord`` (built on each access)."""
        return TelemetryRecord.model_validate(self.body)

    def message_body(self, *, timestamp: str, key: str) -> dict[str, Any]:
        """Return the message body with the processing time (RFC 3339 UTC text) and the idempotency key set."""
        return {**self.body, "timestamp": timestamp, "key": key}

    def message_json(self, *, timestamp: str, key: str) -> bytes:
        """Return ``message_body`` encoded as JSON, the same bytes as ``orjson.dumps`` gives.

        The streamer publishes each row once per pass, so the body is encoded on
        the first call and cut around the timestamp and the key. Later calls join the
        pieces with the new values, which costs less than copying the body's dict and
        encoding it again.
        """
        pieces = self._encoded
        if not pieces:
            pieces.extend(_split_encoded_body(self.body))
        if len(pieces) == 3:
            return b"".join((pieces[0], orjson.dumps(timestamp), pieces[1], orjson.dumps(key), pieces[2]))
        return orjson.dumps(self.message_body(timestamp=timestamp, key=key))

    def stamp(self, *, processed_at: datetime, key: str) -> TelemetryRecord:
        """Return the record with the processing time and the idempotency key set."""
        return self.record.model_copy(update={"timestamp": processed_at, "key": key})


#: Stand-ins for the timestamp and the key while a body is encoded.
_TIMESTAMP_MARK = "\x00timestamp\x00"
_KEY_MARK = "\x00key\x00"


def _split_encoded_body(body: dict[str, Any]) -> list[bytes]:
    """Return the encoded body cut around its timestamp and key, or ``[b""]`` when it cannot be.

    The body has the timestamp before the key, as ``TelemetryRecord.to_body``
    writes them. A body with a NUL character anywhere, or with the key first, is
    not cut, and ``message_json`` encodes it whole each time.
    """
    encoded = orjson.dumps({**body, "timestamp": _TIMESTAMP_MARK, "key": _KEY_MARK})
    head, found_timestamp, rest = encoded.partition(orjson.dumps(_TIMESTAMP_MARK))
    middle, found_key, tail = rest.partition(orjson.dumps(_KEY_MARK))
    pieces = [head, middle, tail]
    # orjson escapes NUL as \u0000, so pieces without that escape contain no other stand-in.
    if found_timestamp and found_key and all(b"\\u0000" not in piece for piece in pieces):
        return pieces
    return [b""]


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A record that was skipped: ``reason`` is one of ``REJECT_REASONS``."""

    line: int
    start_offset: int
    end_offset: int
    reason: str
    message: str


class _RowError(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_labels(raw: str) -> dict[str, str]:
    """Parse ``key="value",key2="value2"`` into a dict.

    Values may contain commas and the escapes ``\\"``, ``\\\\`` and ``\\n``. An empty
    string gives an empty dict. Raises ``ValueError`` naming the text that does not parse.
    """
    return dict(_label_pairs(raw.strip()))


# An exporter writes the same label text for every sample of one (GPU, metric)
# pair, so a dump repeats each text once per scrape, and a streamer in a loop reads
# every text again in each pass. An entry of the real DCGM dump's label texts takes
# about 2 KiB (tracemalloc), so the 8,192 entries take about 16 MiB at most. A dump
# with more distinct texts than that gains nothing, because the loop evicts each
# entry before it comes around again.
@functools.lru_cache(maxsize=8_192)
def _label_pairs(text: str) -> tuple[tuple[str, str], ...]:
    if _LABELS.fullmatch(text) is None:
        _raise_label_error(text)
    pairs = _LABEL.findall(text)
    if "\\" not in text:
        return tuple(pairs)
    return tuple((name, _LABEL_ESCAPE.sub(_unescape, value)) for name, value in pairs)


def _unescape(match: re.Match[str]) -> str:
    return _LABEL_UNESCAPED.get(match.group(1), match.group(0))


def _raise_label_error(text: str) -> None:
    """Raise ``ValueError`` naming the first position in ``text`` where no label matches."""
    position = 0
    while position < len(text):
        match = _LABEL.match(text, position)
        if match is None or match.end() == position:
            break
        position = match.end()
    raise ValueError(
        f"labels_raw is invalid at character {position}: {text[position:position + 40]!r}; "
        'expected key="value" pairs separated by commas'
    )


def read_header(path: Path) -> CsvHeader:
    """Read the header of the dump at ``path``.

    Raises ``CsvFormatError`` when the file is missing or empty, or when the header
    lacks one of ``REQUIRED_COLUMNS``.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError as exc:
        raise CsvFormatError(f"CSV file {str(path)!r} does not exist; pass an existing DCGM dump") from exc
    except IsADirectoryError as exc:
        raise CsvFormatError(f"CSV path {str(path)!r} is a directory, expected a file") from exc
    with handle:
        raw = handle.readline()
        data_offset = handle.tell()

    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    if not raw.strip():
        raise CsvFormatError(f"CSV file {str(path)!r} has no header row; expected {','.join(REQUIRED_COLUMNS)},...")
    try:
        names = next(csv.reader([raw.decode("utf-8")]))
    except UnicodeDecodeError as exc:
        raise CsvFormatError(f"CSV header of {str(path)!r} is not valid UTF-8: {exc}") from exc

    columns = {name.strip(): index for index, name in enumerate(names)}
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise CsvFormatError(
            f"CSV header of {str(path)!r} lacks the column(s) {missing!r}; found {names!r}. "
            "Expected a DCGM exporter dump."
        )
    return CsvHeader(columns=columns, width=len(names), data_offset=data_offset)


def read_rows(
    path: Path,
    header: CsvHeader,
    *,
    start_offset: int | None = None,
    start_line: int = 2,
    end_offset: int | None = None,
) -> Iterator[ParsedRow | RejectedRow]:
    """Yield each record of ``path`` from ``start_offset`` up to ``end_offset``.

    ``start_offset`` defaults to the first record; it must be a record boundary,
    and ``start_line`` is the line number found there. Reading stops at the end of
    the file or at the first record that starts at or after ``end_offset``.
    Empty lines are skipped.
    """
    offset = header.data_offset if start_offset is None else start_offset
    with path.open("rb") as handle:
        handle.seek(offset)
        lines = _LineSource(handle, offset, start_line)
        reader = csv.reader(lines, strict=True)
        layout = _Layout.of(header)
        while end_offset is None or lines.offset < end_offset:
            lines.begin_record()
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                message = f"malformed CSV: {exc}"
                yield RejectedRow(lines.record_line, lines.record_offset, lines.offset, "column_count", message)
                continue
            if not fields:
                continue
            yield _parse_record(fields, layout, lines)


class RowCache:
    """The rows of recently read ranges of files, kept while each file stays unchanged.

    A streamer in a loop reads the same shards of the same file in every pass, and
    parsing them took about a quarter of its CPU in a py-spy profile. ``read``
    yields what ``read_rows`` yields. A range read to its end is kept, and a later
    read of the same range of the same file yields the kept rows. The file counts
    as unchanged while its device, inode, size and modification time stay the
    same, so the range of a rotated, rewritten or appended file is read again.

    At most ``max_rows`` rows are kept, the least recently read ranges leaving
    first. A row of the real DCGM dump takes about 1.2 KiB (tracemalloc), so the
    default of 20,000 rows takes about 24 MiB. A range longer than ``max_rows`` is never kept,
    and ``max_rows=0`` keeps nothing.

    The cached ``ParsedRow`` objects are shared by every pass, which is safe
    because nothing changes a ``ParsedRow`` or its body.
    """

    def __init__(self, max_rows: int = 20_000) -> None:
        if max_rows < 0:
            raise ValueError(f"max_rows must be 0 or more, got {max_rows}")
        self.max_rows = max_rows
        self._ranges: collections.OrderedDict[
            tuple[Any, ...], tuple[tuple[int, ...], list[ParsedRow | RejectedRow]]
        ] = collections.OrderedDict()
        self._rows = 0

    def __len__(self) -> int:
        """Return the number of rows kept."""
        return self._rows

    def read(
        self,
        path: Path,
        header: CsvHeader,
        *,
        start_offset: int | None = None,
        start_line: int = 2,
        end_offset: int | None = None,
    ) -> Iterator[ParsedRow | RejectedRow]:
        """Yield the rows ``read_rows`` yields for these arguments, from the cache when it has them."""
        key = (
            str(path),
            tuple(sorted(header.columns.items())),
            header.width,
            header.data_offset,
            start_offset,
            start_line,
            end_offset,
        )
        identity = _file_identity(path)
        kept = self._ranges.get(key)
        if kept is not None and identity is not None and kept[0] == identity:
            self._ranges.move_to_end(key)
            yield from kept[1]
            return

        collected: list[ParsedRow | RejectedRow] | None = [] if self.max_rows else None
        for row in read_rows(
            path, header, start_offset=start_offset, start_line=start_line, end_offset=end_offset
        ):
            if collected is not None:
                collected.append(row)
                if len(collected) > self.max_rows:
                    collected = None
            yield row
        # Reached only when the caller read the whole range. A file that changed
        # while it was read may have given rows of both versions, so they are not kept.
        if collected is not None and identity is not None and _file_identity(path) == identity:
            self._keep(key, identity, collected)

    def _keep(
        self, key: tuple[Any, ...], identity: tuple[int, ...], rows: list[ParsedRow | RejectedRow]
    ) -> None:
        previous = self._ranges.pop(key, None)
        if previous is not None:
            self._rows -= len(previous[1])
        self._ranges[key] = (identity, rows)
        self._rows += len(rows)
        while self._rows > self.max_rows:
            _, (_, evicted) = self._ranges.popitem(last=False)
            self._rows -= len(evicted)


def _file_identity(path: Path) -> tuple[int, ...] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def scan_records(path: Path, header: CsvHeader) -> Iterator[tuple[int, int, int]]:
    """Yield ``(line, start_offset, end_offset)`` of every record without validating it.

    The records and line numbers are the ones ``read_rows`` yields, at several times
    its speed, which matters when a large file is cut into shards.
    """
    with path.open("rb") as handle:
        handle.seek(header.data_offset)
        lines = _LineSource(handle, header.data_offset, 2)
        reader = csv.reader(lines, strict=True)
        while True:
            lines.begin_record()
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error:
                fields = ["malformed"]
            if fields:
                yield lines.record_line, lines.record_offset, lines.offset


class _LineSource:
    """Decode byte lines for ``csv.reader`` while tracking line numbers and byte offsets.

    ``csv.reader`` pulls exactly the lines of one record per ``next()``, so after a
    record the offset is the byte just past it. Invalid UTF-8 is decoded with
    ``surrogateescape`` and flagged, so the record is rejected but the stream goes on.
    """

    def __init__(self, handle: BinaryIO, offset: int, line: int) -> None:
        self._handle = handle
        self.offset = offset
        self.next_line = line
        self.record_line = line
        self.record_offset = offset
        self.invalid_utf8 = False

    def begin_record(self) -> None:
        self.record_line = self.next_line
        self.record_offset = self.offset
        self.invalid_utf8 = False

    def __iter__(self) -> _LineSource:
        return self

    def __next__(self) -> str:
        raw = self._handle.readline()
        if not raw:
            raise StopIteration
        self.offset += len(raw)
        self.next_line += 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.invalid_utf8 = True
            return raw.decode("utf-8", errors="surrogateescape")


@dataclass(frozen=True, slots=True)
class _Layout:
    """Field positions of one header, looked up once per file instead of once per field."""

    width: int
    timestamp: int
    metric_name: int
    gpu_id: int
    device: int
    uuid: int
    model_name: int
    hostname: int
    value: int
    container: int | None
    pod: int | None
    namespace: int | None
    labels_raw: int | None

    @classmethod
    def of(cls, header: CsvHeader) -> _Layout:
        columns = header.columns
        return cls(
            width=header.width,
            timestamp=columns["timestamp"],
            metric_name=columns["metric_name"],
            gpu_id=columns["gpu_id"],
            device=columns["device"],
            uuid=columns["uuid"],
            model_name=columns["modelName"],
            hostname=columns["Hostname"],
            value=columns["value"],
            container=columns.get("container"),
            pod=columns.get("pod"),
            namespace=columns.get("namespace"),
            labels_raw=columns.get("labels_raw"),
        )


def _parse_record(fields: list[str], layout: _Layout, lines: _LineSource) -> ParsedRow | RejectedRow:
    line, start, end = lines.record_line, lines.record_offset, lines.offset
    try:
        if lines.invalid_utf8:
            raise _RowError("invalid_utf8", "the record is not valid UTF-8")
        if len(fields) != layout.width:
            raise _RowError(
                "column_count", f"the record has {len(fields)} fields, the header has {layout.width}"
            )
        body = _build_body(fields, layout)
    except _RowError as exc:
        return RejectedRow(line, start, end, exc.reason, str(exc))
    return ParsedRow(line, start, end, body)


def _build_body(fields: list[str], layout: _Layout) -> dict[str, Any]:
    """Build the message body of one record, with the checks ``TelemetryRecord`` makes.

    The checks run in the order that decides which reason a bad record gets:
    empty required fields, timestamp, gpu_id, value, labels, then field limits.
    """
    timestamp = fields[layout.timestamp].strip()
    metric_name = fields[layout.metric_name].strip()
    gpu_id = fields[layout.gpu_id].strip()
    device = fields[layout.device].strip()
    uuid = fields[layout.uuid].strip()
    model_name = fields[layout.model_name].strip()
    hostname = fields[layout.hostname].strip()
    value_text = fields[layout.value].strip()
    container = _optional_field(fields, layout.container)
    pod = _optional_field(fields, layout.pod)
    namespace = _optional_field(fields, layout.namespace)
    labels_raw = _optional_field(fields, layout.labels_raw)

    if not (timestamp and metric_name and gpu_id and uuid and hostname and value_text):
        required = (
            ("timestamp", timestamp),
            ("metric_name", metric_name),
            ("gpu_id", gpu_id),
            ("uuid", uuid),
            ("Hostname", hostname),
            ("value", value_text),
        )
        name = next(name for name, text in required if not text)
        raise _RowError("missing_field", f"the field {name!r} is empty")

    source_timestamp = _format_source_timestamp(timestamp)
    gpu_index = _parse_gpu_index(gpu_id)
    value = _parse_value(value_text)
    try:
        labels = parse_labels(labels_raw)
    except ValueError as exc:
        raise _RowError("invalid_labels", str(exc)) from exc

    body = {
        "uuid": uuid,
        "hostname": hostname,
        "gpu_index": gpu_index,
        "device": device,
        "model_name": model_name,
        "metric_name": metric_name,
        "value": value,
        "labels": labels,
        "container": container or None,
        "pod": pod or None,
        "namespace": namespace or None,
        "timestamp": source_timestamp,
        "source_timestamp": source_timestamp,
        "key": "unpublished",
    }
    # The length and range limits of TelemetryRecord's fields. The lower limits of
    # uuid, hostname and metric_name hold already, because they are not empty.
    within_limits = (
        len(uuid) <= 128
        and len(hostname) <= 255
        and gpu_index <= 1_000_000
        and len(device) <= 64
        and len(model_name) <= 255
        and len(metric_name) <= 128
        and len(container) <= 255
        and len(pod) <= 255
        and len(namespace) <= 255
    )
    if not within_limits:
        _check_with_model(body)
    return body


def _optional_field(fields: list[str], index: int | None) -> str:
    return fields[index].strip() if index is not None else ""


def _check_with_model(body: dict[str, Any]) -> None:
    """Validate ``body`` with ``TelemetryRecord`` and raise its first error as ``invalid_field``."""
    try:
        TelemetryRecord.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(item) for item in first["loc"])
        raise _RowError("invalid_field", f"{location}: {first['msg']}") from exc


@functools.lru_cache(maxsize=1024)
def _format_source_timestamp(raw: str) -> str:
    """Parse a CSV timestamp and format it as ``format_timestamp`` does.

    A dump has few distinct timestamps (one per scrape), so the result is cached.
    A ``_RowError`` is raised again on each call, because ``lru_cache`` stores
    only returned values.
    """
    return format_timestamp(_parse_timestamp(raw))


def _parse_timestamp(raw: str) -> datetime:
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
    except ValueError as exc:
        raise _RowError("invalid_timestamp", f"timestamp {raw!r} is not an ISO 8601 time") from exc
    if moment.tzinfo is None:
        # DCGM dumps write UTC; a time without an offset is read as UTC too.
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _parse_gpu_index(raw: str) -> int:
    # ASCII digits only: str.isdigit alone also accepts digits of other scripts.
    if not (raw.isascii() and raw.isdigit()):
        raise _RowError("invalid_gpu_id", f"gpu_id {raw!r} is not a non-negative integer")
    return int(raw)


def _parse_value(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError as exc:
        raise _RowError("invalid_value", f"value {raw!r} is not a number") from exc
    if not math.isfinite(value):
        raise _RowError("non_finite_value", f"value {raw!r} is not a finite number")
    return value
