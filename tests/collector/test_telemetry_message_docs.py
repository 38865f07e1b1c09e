"""The "Telemetry messages" section of docs/queue-api.md matches the record the collector validates."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from collector.storage import store_records
from telemetry.record import InvalidRecord, TelemetryRecord
from telemetry.tables import TelemetrySample

QUEUE_API_DOC = Path(__file__).resolve().parents[2] / "docs" / "queue-api.md"


def telemetry_section() -> str:
    text = QUEUE_API_DOC.read_text()
    start = text.index("## Telemetry messages")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def example_body() -> dict[str, object]:
    """Return the body of the first message of the section's curl example."""
    section = telemetry_section()
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the section has no sh example"
    arguments = shlex.split(block.group(1).replace("\\\n", " "))
    payload = json.loads(arguments[arguments.index("-d") + 1])
    return dict(payload["messages"][0]["body"])


def test_section_lists_every_field() -> None:
    documented = re.findall(r"^\| `(\w+)` \|", telemetry_section(), re.MULTILINE)

    assert sorted(documented) == sorted(TelemetryRecord.model_fields)


def test_section_marks_required_fields() -> None:
    rows = {
        match.group(1): match.group(2).strip()
        for match in re.finditer(r"^\| `(\w+)` \|[^|]*\|([^|]*)\|", telemetry_section(), re.MULTILINE)
    }

    for name, field in TelemetryRecord.model_fields.items():
        expected = "yes" if field.is_required() else "no"
        assert rows[name].startswith(expected), f"{name}: documented as {rows[name]!r}"


def test_example_has_every_field_and_is_valid() -> None:
    body = example_body()

    assert sorted(body) == sorted(TelemetryRecord.model_fields)
    assert TelemetryRecord.parse_body(body).key == body["key"]


def test_example_publishes_to_demo_queue() -> None:
    section = telemetry_section()

    assert "/v1/queues/demo/messages" in section
    assert "/v1/queues/telemetry/messages" not in section


def test_partial_body_rejected_as_missing_field() -> None:
    with pytest.raises(InvalidRecord) as rejected:
        TelemetryRecord.parse_body({"uuid": "GPU-1", "value": 1.0})

    assert rejected.value.reason == "missing_field"
    assert f"`{rejected.value.reason}`" in telemetry_section()


@pytest.mark.parametrize("reason", ["invalid_json", "not_an_object", "invalid_field", "rejected_by_database"])
def test_section_names_rejection_reason(reason: str) -> None:
    assert f"`{reason}`" in telemetry_section()


def test_example_is_stored(engine: Engine) -> None:
    record = TelemetryRecord.parse_body(example_body())

    result = store_records(engine, [record])

    assert result.stored == 1
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(TelemetrySample)).scalar_one() == 1
