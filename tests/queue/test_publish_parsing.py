"""Publish request parsing: the msgspec fast path accepts what the orjson path accepts, and large numbers too."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_server.errors import InvalidRequest
from queue_server.http.requests import loads, parse_publish, parse_publish_body
from telemetry.queue_client import decode_json

MAX_MESSAGES = 5

Outcome = tuple[list[Any], list[str | None], list[float]] | str


def by_fast_path(body: bytes) -> Outcome:
    try:
        bodies, keys, delays = parse_publish_body(body, MAX_MESSAGES)
    except InvalidRequest as error:
        return f"invalid: {error}"
    return [decode_json(encoded) for encoded in bodies], keys, delays


def by_orjson_path(body: bytes) -> Outcome:
    try:
        bodies, keys, delays = parse_publish(loads(body), MAX_MESSAGES)
    except InvalidRequest as error:
        return f"invalid: {error}"
    return [orjson.loads(encoded) for encoded in bodies], keys, delays


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=10,
)

messages = st.fixed_dictionaries(
    {"body": json_values},
    optional={
        "key": st.none() | st.text(max_size=3) | st.integers(),
        "delay_s": st.none() | st.floats(min_value=-1, max_value=50_000, allow_nan=False) | st.text(max_size=2),
        "extra": st.integers(),
    },
)

requests = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(messages, max_size=MAX_MESSAGES + 1)}),
    st.fixed_dictionaries({"messages": st.lists(messages, max_size=2)}, optional={"other": st.integers()}),
    json_values,
)


@settings(max_examples=300, deadline=None)
@given(request=requests, indent=st.sampled_from([None, 1]))
def test_fast_path_agrees_with_orjson_path(request: Any, indent: int | None) -> None:
    body = json.dumps(request, indent=indent).encode()
    assert by_fast_path(body) == by_orjson_path(body)


# Numbers too large for a double: orjson rejects them, the fast path keeps them as sent.
LARGE_NUMBERS = [b"1e400", b"-1E+400", b"1" * 400, b"1" * 250 + b"e99", b"0.5e0400"]

# Texts spliced into a valid request's body, some valid JSON and some not.
SPLICES = [
    b"1e-400", b"1e99", b"\"\xff\"",
    b"\"\\ud800\"", b"\"\\udc00x\"", b"\"a\x01\"", b"01", b"1.", b".5", b"+1", b"NaN", b"Infinity", b"[1,]",
    b"{\"a\":1,}", b"\"\\x41\"", b"-", b"1e", b"[" * 600 + b"]" * 600, b"\"\\u00e9\"", b"true", b"\"e123\"",
]


@pytest.mark.parametrize("splice", SPLICES, ids=range(len(SPLICES)))
@pytest.mark.parametrize(
    "template",
    [b'{"messages":[{"body":%s,"key":"k"}]}', b'{"messages": [ {"body": {"v": [ %s ]}} ]}'],
    ids=["body", "nested"],
)
def test_fast_path_agrees_on_edge_values(splice: bytes, template: bytes) -> None:
    body = template % splice
    assert by_fast_path(body) == by_orjson_path(body)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fast_path_agrees_on_corrupted_requests(data: st.DataObject) -> None:
    body = bytearray(b'{"messages":[{"body":{"value":12.5,"name":"gpu-0","tags":["a"]},"key":"k1","delay_s":2}]}')
    position = data.draw(st.integers(min_value=0, max_value=len(body)))
    # Without an "e", an insertion cannot make a number too large for a double.
    inserted = data.draw(st.binary(min_size=0, max_size=3).filter(lambda text: not set(text) & set(b"eE")))
    removed = data.draw(st.integers(min_value=0, max_value=2))
    body[position : position + removed] = inserted
    assert by_fast_path(bytes(body)) == by_orjson_path(bytes(body))


@pytest.mark.parametrize("number", LARGE_NUMBERS, ids=range(len(LARGE_NUMBERS)))
def test_large_numbers_accepted_as_sent(number: bytes) -> None:
    body = b'{"messages":[{"body":{"value":%s},"key":"k"}]}' % number

    bodies, keys, _ = parse_publish_body(body, MAX_MESSAGES)

    assert bodies == [b'{"value":%s}' % number]
    assert keys == ["k"]
    # Python's json module decodes these as decode_json does: infinity, or an exact integer.
    assert decode_json(bodies[0]) == {"value": json.loads(number)}
    assert by_orjson_path(body).startswith("invalid: request body is not valid JSON")


def test_fast_path_keeps_the_body_as_sent() -> None:
    body = b'{"messages": [{"body": {"b": 1,  "a": [1.50, "x"]}, "key": "k"}, {"body": null, "delay_s": 3}]}'
    bodies, keys, delays = parse_publish_body(body, MAX_MESSAGES)
    assert bodies == [b'{"b": 1,  "a": [1.50, "x"]}', b"null"]
    assert keys == ["k", None]
    assert delays == [0.0, 3.0]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"messages":[{"body":{"v":1e400}},{"key":"k"}]}', "request body is not valid JSON"),
        (b'{"messages":[{"body":"\xff"}]}', "request body is not valid JSON"),
        (b'{"messages":[]}', "expected a list of 1 to 5 messages"),
        (b'{"messages":[{"key":"k"}]}', "messages[0] has no 'body'"),
        (b'{"messages":[{"body":1,"key":""}]}', "messages[0].key='' is invalid"),
        (b'{"messages":[{"body":1,"delay_s":43201}]}', "delay_s=43201 is invalid"),
    ],
)
def test_rejected_requests_name_the_problem(body: bytes, error: str) -> None:
    with pytest.raises(InvalidRequest, match=error.replace("[", r"\[").replace("]", r"\]")):
        parse_publish_body(body, MAX_MESSAGES)
