"""DecodedRecord in UTC with checked labels, the collector's fast path, accepts only what TelemetryRecord accepts, with equal values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry.record import DecodedRecord, InvalidRecord, LabelsCheck, TelemetryRecord, labels_json

VALID_BODY: dict[str, Any] = {
    "uuid": "GPU-5fd4f087-86f3-7a43-b711-4771313afc50",
    "hostname": "mtv5-dgx1-hgpu-031",
    "gpu_index": 0,
    "device": "nvidia0",
    "model_name": "NVIDIA H100 80GB HBM3",
    "metric_name": "DCGM_FI_DEV_GPU_UTIL",
    "value": 42.5,
    "labels": {"job": "dgx_dcgm_exporter", "gpu": "0"},
    "container": None,
    "pod": None,
    "namespace": None,
    "timestamp": "2026-01-02T03:04:05.000006Z",
    "source_timestamp": "2025-07-18T20:42:34.000000Z",
    "key": "dcgm.csv:run-1:0:2",
}


#: One check for the whole module, as a collector keeps one, so that remembered
#: labels are part of what the tests cover.
LABELS_CHECK = LabelsCheck(limit=50)


def decode_fast(body: bytes) -> DecodedRecord | None:
    """Return the record when the collector's fast path takes the body: decoded, in UTC, labels checked."""
    try:
        record = msgspec.json.decode(body, type=DecodedRecord)
    except msgspec.ValidationError:
        return None
    return record if record.in_utc and LABELS_CHECK(record.labels) else None


def decode_pydantic(body: bytes) -> TelemetryRecord | None:
    try:
        return TelemetryRecord.parse_body(body)
    except InvalidRecord:
        return None


def assert_same_record(fast: DecodedRecord, slow: TelemetryRecord) -> None:
    assert orjson.loads(labels_json(fast)) == slow.labels
    assert orjson.loads(labels_json(slow)) == slow.labels
    for name in TelemetryRecord.model_fields:
        if name == "labels":
            continue
        assert getattr(fast, name) == getattr(slow, name), name
        assert type(getattr(fast, name)) is type(getattr(slow, name)), name
    for moment in (fast.timestamp, fast.source_timestamp):
        assert moment is None or moment.utcoffset() == timedelta(0)


def rfc3339(moment: datetime, fraction_digits: int, offset: str) -> str:
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction_digits:
        text += "." + f"{moment.microsecond:06d}{moment.microsecond % 997:03d}"[:fraction_digits]
    return text + offset


timestamps = st.one_of(
    st.builds(
        rfc3339,
        st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
        st.integers(0, 9),
        st.sampled_from(["Z", "z", "+00:00", "-00:00", "+02:00", "-11:30", "+14:00", ""]),
    ),
    st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-01-01T00:00Z",
                     "2026-01-01 00:00:00Z", "2026-01-01T00:00:60Z", "2026-13-01T00:00:00Z", ""]),
    st.integers(-10, 2_000_000_000),
    st.none(),
)


def text(max_size: int) -> st.SearchStrategy[Any]:
    # Lengths at the limit are drawn on purpose, in characters that take two bytes.
    at_limit = st.integers(max_size - 1, max_size + 1).map(lambda length: "\u00e9" * length)
    return st.one_of(st.text(max_size=max_size + 2), at_limit, st.just(""), st.integers(-3, 3), st.none())


FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "uuid": text(128),
    "hostname": text(255),
    "gpu_index": st.one_of(
        st.integers(-2, 1_000_002), st.sampled_from([-1, 0, 1_000_000, 1_000_001, "3", "x", 3.0, 2.5, True])
    ),
    "device": text(64),
    "model_name": text(255),
    "metric_name": text(128),
    "value": st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from(["1.5", "nan", True, None]),
    ),
    "labels": st.one_of(
        st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), st.integers(-3, 3), st.none())),
        st.sampled_from([{"job": "dgx_dcgm_exporter", "gpu": "0"}, {"gpu": 0}, {"gpu": None}, {}]),
        st.none(), st.just([]), st.just("labels"),
    ),
    "container": text(255),
    "pod": text(255),
    "namespace": text(255),
    "timestamp": timestamps,
    "source_timestamp": timestamps,
    "key": text(255),
}


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    body = dict(VALID_BODY)
    for name in draw(st.sets(st.sampled_from(sorted(FIELD_VALUES)), max_size=3)):
        body[name] = draw(FIELD_VALUES[name])
    for name in draw(st.sets(st.sampled_from(sorted(VALID_BODY)), max_size=1)):
        del body[name]
    if draw(st.booleans()) and draw(st.booleans()):
        body["unexpected"] = 1
    return body


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_fast_path_within_pydantic(body: dict[str, Any]) -> None:
    raw = orjson.dumps(body)
    fast = decode_fast(raw)
    if fast is None:
        return
    slow = decode_pydantic(raw)
    assert slow is not None, f"DecodedRecord accepted a body that TelemetryRecord rejects: {body!r}"
    assert_same_record(fast, slow)


def test_field_names_match() -> None:
    assert set(DecodedRecord.__struct_fields__) == set(TelemetryRecord.model_fields)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"timestamp": "2026-01-02T03:04:05.1234567+00:00"},
        {"timestamp": "2026-01-02T03:04:05.123456789Z"},
        {"source_timestamp": None, "labels": {}},
        {"gpu_index": 1_000_000, "device": "", "model_name": ""},
    ],
)
def test_both_forms_accept_valid_bodies(changes: dict[str, Any]) -> None:
    raw = orjson.dumps({**VALID_BODY, **changes})
    fast = decode_fast(raw)
    slow = decode_pydantic(raw)
    assert fast is not None
    assert slow is not None
    assert_same_record(fast, slow)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"gpu_index": "3"}, "a number sent as text"),
        ({"value": "1.5"}, "a number sent as text"),
        ({"timestamp": 1767322800}, "Unix seconds"),
        ({"timestamp": "2026-01-01T00:00Z"}, "a time without seconds"),
    ],
)
def test_conversions_left_to_pydantic(changes: dict[str, Any], reason: str) -> None:
    raw = orjson.dumps({**VALID_BODY, **changes})
    assert decode_fast(raw) is None, reason
    assert decode_pydantic(raw) is not None, reason


def test_offset_out_of_utc_range_rejected() -> None:
    raw = orjson.dumps({**VALID_BODY, "timestamp": "0001-01-01T00:00:00+01:00"})
    assert decode_fast(raw) is None
    with pytest.raises(InvalidRecord, match="out of range in UTC"):
        TelemetryRecord.parse_body(raw)


@pytest.mark.parametrize("field", ["timestamp", "source_timestamp"])
def test_offset_left_to_pydantic(field: str) -> None:
    raw = orjson.dumps({**VALID_BODY, field: "2026-01-02T05:04:05.5+02:00"})

    decoded = msgspec.json.decode(raw, type=DecodedRecord)
    slow = decode_pydantic(raw)

    assert not decoded.in_utc
    assert decode_fast(raw) is None
    assert slow is not None
    assert getattr(slow, field) == datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)
    assert getattr(slow, field).tzinfo is UTC


@pytest.mark.parametrize("year", [1, 999, 1000, 2026])
def test_formatted_times_decode_back(year: int) -> None:
    moment = datetime(year, 1, 2, 3, 4, 5, tzinfo=UTC)
    record = TelemetryRecord.model_validate({**VALID_BODY, "timestamp": moment, "source_timestamp": moment})
    raw = orjson.dumps(record.to_body())

    fast = decode_fast(raw)
    slow = decode_pydantic(raw)

    assert fast is not None
    assert fast.timestamp == moment
    assert fast.source_timestamp == moment
    assert slow is not None
    assert slow.timestamp == moment


@pytest.mark.parametrize(
    ("labels", "valid"),
    [
        (b"{}", True),
        (b'{"gpu": "0", "job": "a\\"b", "note": "\\u00e9"}', True),
        (b'{"gpu": 0}', False),
        (b'{"gpu": null}', False),
        (b'{"gpu": {"nested": "x"}}', False),
        (b"[]", False),
        (b"null", False),
        (b'"labels"', False),
    ],
)
def test_labels_check(labels: bytes, valid: bool) -> None:
    check = LabelsCheck(limit=2)
    assert check(msgspec.Raw(labels)) is valid
    assert check(msgspec.Raw(labels)) is valid, "a second check of the same text"


def test_labels_check_forgets_past_its_limit() -> None:
    check = LabelsCheck(limit=2)
    texts = [b'{"gpu": "%d"}' % number for number in range(5)]
    for text in texts:
        assert check(msgspec.Raw(text))
    assert len(check._valid) <= 2
    assert all(check(msgspec.Raw(text)) for text in texts)
    assert not check(msgspec.Raw(b'{"gpu": 5}'))


def test_labels_stored_as_sent() -> None:
    raw = b'{"uuid": "GPU-1", "hostname": "h", "gpu_index": 0, "device": "d", "model_name": "m",' \
          b' "metric_name": "x", "value": 1, "timestamp": "2026-01-02T03:04:05Z", "key": "k",' \
          b' "labels": {"b": "2",  "a": "\\u00e9"}}'
    record = msgspec.json.decode(raw, type=DecodedRecord)
    assert labels_json(record) == '{"b": "2",  "a": "\\u00e9"}'
    assert orjson.loads(labels_json(record)) == {"b": "2", "a": "\u00e9"}
    assert record.to_plain()["labels"] == {"b": "2", "a": "\u00e9"}
    without = msgspec.json.decode(raw.replace(b', "labels": {"b": "2",  "a": "\\u00e9"}', b""), type=DecodedRecord)
    assert labels_json(without) == "{}"
