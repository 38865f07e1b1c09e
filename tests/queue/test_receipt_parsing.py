"""``parse_receipts`` reads a whole request at once and agrees with ``parse_receipt`` on every text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_server.core.receipts import format_receipt, parse_receipt, parse_receipts

RECEIPTS = st.builds(
    format_receipt,
    st.integers(0, 10**18 - 1),
    st.integers(0, 10**7 - 1),
    st.integers(0, 10**10 - 1),
    st.integers(0, 10**10 - 1),
)
#: Texts near the receipt form: separators, leading zeros, signs, too many digits, other digits.
NEAR_RECEIPTS = st.text(alphabet="0123456789-,+ \n.e١", max_size=60)
ANY_VALUE = st.one_of(RECEIPTS, NEAR_RECEIPTS, st.none(), st.integers(), st.floats(), st.lists(st.integers(), max_size=2))


@given(st.lists(RECEIPTS, min_size=1, max_size=50))
def test_valid_receipts_parse_whole(receipts: list[str]) -> None:
    assert parse_receipts(receipts) == [parse_receipt(text) for text in receipts]
    assert all(parsed is not None for parsed in parse_receipts(receipts))


@settings(max_examples=300)
@given(st.lists(ANY_VALUE, max_size=20))
def test_any_list_parses_per_text(texts: list[object]) -> None:
    assert parse_receipts(texts) == [parse_receipt(text) for text in texts]


@pytest.mark.parametrize(
    "texts",
    [
        ["1-2-3-4,5-6-7-8"],
        ["1-2-3-4,5-6-7-8", "9-9-9-9"],
        ["01-2-3-4", "1-2-3-4"],
        ["1-2-3-4", ""],
        ["1-2-3-4", "1-2-3"],
        ["1-2-3-4", "١-2-3-4"],
        ["1-2-3-4", None],
        ["1234567890123456789-0-1-1"],
    ],
    ids=["comma", "comma-and-receipt", "leading-zero", "empty", "short", "arabic-indic-digit", "null", "long-seq"],
)
def test_mixed_lists_parse_per_text(texts: list[object]) -> None:
    assert parse_receipts(texts) == [parse_receipt(text) for text in texts]
