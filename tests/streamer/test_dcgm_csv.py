"""Parsing of DCGM exporter CSV dumps: good rows, every kind of bad row, file formats."""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from streamer.dcgm_csv import (
    REJECT_REASONS,
    CsvFormatError,
    ParsedRow,
    RejectedRow,
    RowCache,
    parse_labels,
    read_header,
    read_rows,
)
from telemetry.record import TelemetryRecord, format_timestamp

HEADER = b"timestamp,metric_name,gpu_id,device,uuid,modelName,Hostname,container,pod,namespace,value,labels_raw"
LABELS = b'"DCGM_FI_DRIVER_VERSION=""535.129.03"",Hostname=""host-1"",gpu=""0"""'


def record(
    *,
    timestamp: bytes = b'"2025-07-18T20:42:34Z"',
    metric: bytes = b'"DCGM_FI_DEV_GPU_UTIL"',
    gpu_id: bytes = b'"0"',
    uuid: bytes = b'"GPU-1"',
    hostname: bytes = b'"host-1"',
    container: bytes = b'""',
    value: bytes = b'"42.5"',
    labels: bytes = LABELS,
) -> bytes:
    fields = [
        timestamp, metric, gpu_id, b'"nvidia0"', uuid, b'"NVIDIA H100 80GB HBM3"', hostname,
        container, b'""', b'""', value, labels,
    ]
    return b",".join(fields)


def parse(tmp_path: Path, content: bytes) -> list[ParsedRow | RejectedRow]:
    path = tmp_path / "dump.csv"
    path.write_bytes(content)
    return list(read_rows(path, read_header(path)))


GOOD = record()

BAD_ROWS = [
    pytest.param(record(uuid=b'""'), "missing_field", id="missing-uuid"),
    pytest.param(record(hostname=b'"  "'), "missing_field", id="blank-hostname"),
    pytest.param(record(value=b'""'), "missing_field", id="missing-value"),
    pytest.param(record(value=b'"abc"'), "invalid_value", id="non-numeric-value"),
    pytest.param(record(value=b'"NaN"'), "non_finite_value", id="nan-value"),
    pytest.param(record(value=b'"inf"'), "non_finite_value", id="infinite-value"),
    pytest.param(record(value=b'"-Infinity"'), "non_finite_value", id="negative-infinity"),
    pytest.param(record(gpu_id=b'"-1"'), "invalid_gpu_id", id="negative-gpu-id"),
    pytest.param(record(gpu_id=b'"one"'), "invalid_gpu_id", id="text-gpu-id"),
    pytest.param(record(timestamp=b'"yesterday"'), "invalid_timestamp", id="bad-timestamp"),
    pytest.param(record(labels=b'"gpu=0"'), "invalid_labels", id="unquoted-label"),
    pytest.param(record(labels=b'"gpu=""0"" job"'), "invalid_labels", id="label-junk"),
    pytest.param(GOOD + b',"extra"', "column_count", id="too-many-columns"),
    pytest.param(b'"2025-07-18T20:42:34Z","DCGM_FI_DEV_GPU_UTIL","0"', "column_count", id="too-few-columns"),
    pytest.param(record(hostname=b'"host-\xff"'), "invalid_utf8", id="invalid-utf8"),
    pytest.param(record(uuid=b'"' + b"G" * 200 + b'"'), "invalid_field", id="uuid-too-long"),
    pytest.param(record(gpu_id=b'"1000001"'), "invalid_field", id="gpu-id-too-large"),
    pytest.param(record(hostname=b'"' + b"h" * 256 + b'"'), "invalid_field", id="hostname-too-long"),
    pytest.param(record(metric=b'"' + b"M" * 129 + b'"'), "invalid_field", id="metric-too-long"),
    pytest.param(record(container=b'"' + b"c" * 256 + b'"'), "invalid_field", id="container-too-long"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_ROWS)
def test_bad_row_rejected_and_stream_continues(tmp_path: Path, line: bytes, reason: str) -> None:
    rows = parse(tmp_path, HEADER + b"\n" + GOOD + b"\n" + line + b"\n" + GOOD + b"\n")

    assert [type(row) for row in rows] == [ParsedRow, RejectedRow, ParsedRow]
    rejected = rows[1]
    assert isinstance(rejected, RejectedRow)
    assert rejected.reason == reason
    assert rejected.reason in REJECT_REASONS
    assert rejected.line == 3
    assert rows[2].line == 4


FORMATS = [
    pytest.param(HEADER + b"\n" + GOOD + b"\n", id="plain"),
    pytest.param(b"\xef\xbb\xbf" + HEADER + b"\n" + GOOD + b"\n", id="utf8-bom"),
    pytest.param(HEADER + b"\r\n" + GOOD + b"\r\n", id="crlf"),
    pytest.param(HEADER + b"\n" + GOOD, id="no-trailing-newline"),
    pytest.param(HEADER + b"\r\n" + GOOD, id="crlf-no-trailing-newline"),
    pytest.param(HEADER + b"\n\n" + GOOD + b"\n\n", id="blank-lines"),
]


@pytest.mark.parametrize("content", FORMATS)
def test_file_format_variants_parse(tmp_path: Path, content: bytes) -> None:
    rows = parse(tmp_path, content)

    assert len(rows) == 1
    row = rows[0]
    assert isinstance(row, ParsedRow)
    assert row.record.uuid == "GPU-1"
    assert row.record.hostname == "host-1"
    assert row.record.value == 42.5
    assert row.record.labels == {"DCGM_FI_DRIVER_VERSION": "535.129.03", "Hostname": "host-1", "gpu": "0"}


def test_columns_found_by_header_name(tmp_path: Path) -> None:
    content = (
        b"value,Hostname,uuid,gpu_id,metric_name,timestamp,modelName,device\n"
        b'"7","host-9","GPU-9","3","DCGM_FI_DEV_GPU_TEMP","2025-07-18T20:42:35Z","H100","nvidia3"\n'
    )
    rows = parse(tmp_path, content)

    assert len(rows) == 1
    row = rows[0]
    assert isinstance(row, ParsedRow)
    assert row.record.hostname == "host-9"
    assert row.record.gpu_index == 3
    assert row.record.value == 7.0
    assert row.record.labels == {}
    assert row.record.container is None


def test_quoted_commas_quotes_and_newlines(tmp_path: Path) -> None:
    labels = b'"job=""a,b"",note=""say \\""hi\\"""",multi=""x\ny"""'
    rows = parse(tmp_path, HEADER + b"\n" + record(container=b'"box, ""one"""', labels=labels) + b"\n" + GOOD)

    assert len(rows) == 2
    first = rows[0]
    assert isinstance(first, ParsedRow)
    assert first.record.container == 'box, "one"'
    assert first.record.labels == {"job": "a,b", "note": 'say "hi"', "multi": "x\ny"}
    assert rows[1].line == 4  # the quoted newline makes the first record span lines 2 and 3


def test_record_fields_and_stamp(tmp_path: Path) -> None:
    row = parse(tmp_path, HEADER + b"\n" + GOOD)[0]
    assert isinstance(row, ParsedRow)
    processed = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)

    body = row.stamp(processed_at=processed, key="k1").to_body()

    assert body["timestamp"] == "2026-01-02T03:04:05.000006Z"
    assert body["source_timestamp"] == "2025-07-18T20:42:34.000000Z"
    assert body["key"] == "k1"
    assert body["gpu_index"] == 0
    assert body["device"] == "nvidia0"
    assert body["model_name"] == "NVIDIA H100 80GB HBM3"
    assert body["metric_name"] == "DCGM_FI_DEV_GPU_UTIL"
    assert body["container"] is None
    assert body["pod"] is None
    assert body["namespace"] is None


LABEL_CASES = [
    pytest.param("", {}, id="empty"),
    pytest.param('a="1"', {"a": "1"}, id="one"),
    pytest.param('a="1", b="x,y"', {"a": "1", "b": "x,y"}, id="comma-in-value"),
    pytest.param('a="q\\"q",b="back\\\\slash"', {"a": 'q"q', "b": "back\\slash"}, id="escapes"),
    pytest.param('__name__="DCGM_FI_DEV_GPU_UTIL"', {"__name__": "DCGM_FI_DEV_GPU_UTIL"}, id="dunder-name"),
    pytest.param(' a = "1" , b="2",', {"a": "1", "b": "2"}, id="spaces-and-trailing-comma"),
    pytest.param('a="line\\nbreak",a="again"', {"a": "again"}, id="repeated-name-keeps-last"),
    pytest.param('a="x\\ny",b="\\t"', {"a": "x\ny", "b": "\\t"}, id="newline-and-unknown-escape"),
]


@pytest.mark.parametrize(("raw", "expected"), LABEL_CASES)
def test_parse_labels(raw: str, expected: dict[str, str]) -> None:
    assert parse_labels(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ['a=1', 'a="1" b="2"', '="x"', 'a="unterminated'],
    ids=["unquoted", "no-comma", "no-name", "open-quote"],
)
def test_parse_labels_rejects(raw: str) -> None:
    with pytest.raises(ValueError, match="labels_raw is invalid"):
        parse_labels(raw)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CsvFormatError, match="does not exist"):
        read_header(tmp_path / "absent.csv")


@pytest.mark.parametrize(
    "content",
    [b"", b"\n", b"timestamp,metric_name,value\n"],
    ids=["empty-file", "blank-header", "header-lacks-columns"],
)
def test_bad_header_is_an_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "dump.csv"
    path.write_bytes(content)

    with pytest.raises(CsvFormatError):
        read_header(path)


def test_reading_from_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "dump.csv"
    path.write_bytes(HEADER + b"\n" + GOOD + b"\n" + record(gpu_id=b'"1"') + b"\n" + record(gpu_id=b'"2"') + b"\n")
    header = read_header(path)
    rows = list(read_rows(path, header))

    second = rows[1]

    middle = list(
        read_rows(path, header, start_offset=second.start_offset, start_line=second.line, end_offset=second.end_offset)
    )

    assert len(middle) == 1
    assert middle[0].line == 3
    assert isinstance(middle[0], ParsedRow)
    assert middle[0].record.gpu_index == 1


def write_dump(path: Path, *records: bytes) -> Path:
    path.write_bytes(HEADER + b"\n" + b"".join(line + b"\n" for line in records))
    return path


def test_row_cache_until_file_changes(tmp_path: Path) -> None:
    path = write_dump(tmp_path / "dump.csv", GOOD, record(gpu_id=b'"1"'), b'"not","enough"')
    header = read_header(path)
    cache = RowCache()

    first = list(cache.read(path, header))
    again = list(cache.read(path, header))

    assert first == list(read_rows(path, header))
    assert [type(row) for row in first] == [ParsedRow, ParsedRow, RejectedRow]
    assert all(kept is row for kept, row in zip(again, first, strict=True))
    assert len(cache) == 3

    write_dump(path, record(gpu_id=b'"7"'))
    changed = list(cache.read(path, header))

    assert [row.record.gpu_index for row in changed if isinstance(row, ParsedRow)] == [7]
    assert len(cache) == 1


def test_row_cache_separate_ranges(tmp_path: Path) -> None:
    path = write_dump(tmp_path / "dump.csv", GOOD, record(gpu_id=b'"1"'), record(gpu_id=b'"2"'))
    header = read_header(path)
    rows = list(read_rows(path, header))
    cache = RowCache()

    whole = list(cache.read(path, header))
    tail = list(cache.read(path, header, start_offset=rows[1].start_offset, start_line=rows[1].line))

    assert whole == rows
    assert tail == rows[1:]
    assert len(cache) == 5


def test_row_cache_skips_unfinished_read(tmp_path: Path) -> None:
    path = write_dump(tmp_path / "dump.csv", GOOD, record(gpu_id=b'"1"'))
    header = read_header(path)
    cache = RowCache()

    reader = cache.read(path, header)
    next(reader)
    reader.close()

    assert len(cache) == 0
    assert len(list(cache.read(path, header))) == 2


@pytest.mark.parametrize(("max_rows", "kept"), [(0, 0), (1, 0), (2, 2), (3, 2), (4, 4)])
def test_row_cache_row_limit(tmp_path: Path, max_rows: int, kept: int) -> None:
    """Ranges of two rows each: a range over the limit is not kept, the oldest range leaves first."""
    first = write_dump(tmp_path / "first.csv", GOOD, record(gpu_id=b'"1"'))
    second = write_dump(tmp_path / "second.csv", record(gpu_id=b'"2"'), record(gpu_id=b'"3"'))
    cache = RowCache(max_rows)

    list(cache.read(first, read_header(first)))
    list(cache.read(second, read_header(second)))

    assert len(cache) == kept
    if kept == 2:
        again = list(cache.read(second, read_header(second)))
        assert len(cache) == 2
        assert [row.record.gpu_index for row in again if isinstance(row, ParsedRow)] == [2, 3]


def test_row_cache_negative_limit() -> None:
    with pytest.raises(ValueError, match="max_rows must be 0 or more"):
        RowCache(-1)


def test_real_csv_parses_completely(real_csv: Path) -> None:
    rows = list(read_rows(real_csv, read_header(real_csv)))
    parsed = [row for row in rows if isinstance(row, ParsedRow)]

    assert len(rows) == 2470
    assert len(parsed) == 2470
    assert len({row.record.uuid for row in parsed}) == 247
    assert len({row.record.hostname for row in parsed}) == 31
    assert len({row.record.metric_name for row in parsed}) == 10
    assert all(row.record.labels["UUID"] == row.record.uuid for row in parsed)


def test_limits_at_maximum_accepted(tmp_path: Path) -> None:
    content = record(
        uuid=b'"' + b"G" * 128 + b'"',
        hostname=b'"' + b"h" * 255 + b'"',
        metric=b'"' + b"M" * 128 + b'"',
        gpu_id=b'"1000000"',
        container=b'"' + b"c" * 255 + b'"',
    )
    rows = parse(tmp_path, HEADER + b"\n" + content + b"\n")

    assert len(rows) == 1
    assert isinstance(rows[0], ParsedRow)
    assert rows[0].record.gpu_index == 1_000_000


def test_invalid_field_message_names_field(tmp_path: Path) -> None:
    rows = parse(tmp_path, HEADER + b"\n" + record(gpu_id=b'"1000001"') + b"\n")

    rejected = rows[0]
    assert isinstance(rejected, RejectedRow)
    assert rejected.message == "gpu_index: Input should be less than or equal to 1000000"


def reference_bodies(path: Path, processed: datetime) -> list[dict[str, object]]:
    """Build every row's message body through TelemetryRecord, field by field from csv.DictReader."""
    bodies = []
    with path.open(newline="", encoding="utf-8") as source:
        for line, fields in enumerate(csv.DictReader(source), start=2):
            source_time = datetime.fromisoformat(fields["timestamp"].replace("Z", "+00:00"))
            record = TelemetryRecord(
                uuid=fields["uuid"],
                hostname=fields["Hostname"],
                gpu_index=int(fields["gpu_id"]),
                device=fields["device"],
                model_name=fields["modelName"],
                metric_name=fields["metric_name"],
                value=float(fields["value"]),
                labels=parse_labels(fields["labels_raw"]),
                container=fields["container"] or None,
                pod=fields["pod"] or None,
                namespace=fields["namespace"] or None,
                timestamp=processed + timedelta(microseconds=line),
                source_timestamp=source_time,
                key=f"real.csv:run:0:{line}",
            )
            bodies.append(record.to_body())
    return bodies


def test_real_csv_bodies_equal_record_to_body(real_csv: Path) -> None:
    processed = datetime(2026, 12, 4, 21, 30, 59, 999_000, tzinfo=UTC)
    expected = reference_bodies(real_csv, processed)

    rows = [row for row in read_rows(real_csv, read_header(real_csv)) if isinstance(row, ParsedRow)]
    bodies = [
        row.message_body(
            timestamp=format_timestamp(processed + timedelta(microseconds=row.line)),
            key=f"real.csv:run:0:{row.line}",
        )
        for row in rows
    ]

    assert len(bodies) == len(expected) == 2470
    for body, reference in zip(bodies, expected, strict=True):
        assert body == reference
        # Same field order too, so the encoded message is byte for byte the same.
        assert orjson.dumps(body) == orjson.dumps(reference)
        assert TelemetryRecord.parse_body(orjson.dumps(body)).to_body() == reference


def test_message_body_leaves_row_unchanged(tmp_path: Path) -> None:
    row = parse(tmp_path, HEADER + b"\n" + GOOD)[0]
    assert isinstance(row, ParsedRow)
    before = dict(row.body)

    body = row.message_body(timestamp="2026-01-02T03:04:05.000006Z", key="k1")

    assert row.body == before
    assert body["timestamp"] == "2026-01-02T03:04:05.000006Z"
    assert body["key"] == "k1"
    assert body["source_timestamp"] == "2025-07-18T20:42:34.000000Z"
    assert list(body) == list(before)


def test_parse_labels_repeats_from_cache() -> None:
    text = 'job="dcgm",gpu="0"'

    first = parse_labels(text)
    first["job"] = "changed"
    second = parse_labels(text)

    assert second == {"job": "dcgm", "gpu": "0"}
    for _ in range(2):
        with pytest.raises(ValueError, match="labels"):
            parse_labels('a="1",b')


def test_parse_labels_error_names_position() -> None:
    with pytest.raises(ValueError, match="at character 6: 'b'"):
        parse_labels('a="1",b')


def test_real_csv_message_json_matches_dumps(real_csv: Path) -> None:
    rows = [row for row in read_rows(real_csv, read_header(real_csv)) if isinstance(row, ParsedRow)]

    for number in range(2):
        for row in rows:
            stamp, key = f"2026-12-05T10:00:0{number}.{row.line:06d}Z", f"real.csv:run:{number}:{row.line}"
            assert row.message_json(timestamp=stamp, key=key) == orjson.dumps(row.message_body(timestamp=stamp, key=key))


@pytest.mark.parametrize(
    ("timestamp", "key"),
    [("2026-01-02T03:04:05Z", 'say "hi"\\'), ("\x00timestamp\x00", "\x00key\x00"), ("t", "ключ\U0001f600")],
    ids=["quotes", "stand-ins-as-values", "unicode"],
)
def test_message_json_escapes_values(tmp_path: Path, timestamp: str, key: str) -> None:
    row = parse(tmp_path, HEADER + b"\n" + GOOD)[0]
    assert isinstance(row, ParsedRow)

    first = row.message_json(timestamp=timestamp, key=key)
    second = row.message_json(timestamp=timestamp, key=key)

    assert first == second == orjson.dumps(row.message_body(timestamp=timestamp, key=key))
    assert orjson.loads(first)["key"] == key


def test_message_json_with_nul_in_labels(tmp_path: Path) -> None:
    row = parse(tmp_path, HEADER + b"\n" + GOOD)[0]
    assert isinstance(row, ParsedRow)
    with_nul = ParsedRow(row.line, row.start_offset, row.end_offset, {**row.body, "labels": {"a": "\x00timestamp\x00"}})

    encoded = with_nul.message_json(timestamp="2026-01-02T03:04:05Z", key="k")

    assert orjson.loads(encoded)["labels"] == {"a": "\x00timestamp\x00"}
    assert orjson.loads(encoded)["timestamp"] == "2026-01-02T03:04:05Z"
