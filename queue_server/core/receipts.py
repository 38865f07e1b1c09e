"""Receipts: the fencing token of one delivery.

A receipt names the message, its delivery count and the server epoch (a number
that grows on every start). A later delivery of the same message has a higher
count or a later epoch, so a receipt from an earlier delivery no longer matches.
"""

from __future__ import annotations

import re

_RECEIPT = re.compile(r"(\d{1,18})-(\d{1,7})-(\d{1,10})-(\d{1,10})")


#: A parsed receipt: batch sequence, index in the batch, delivery count, server epoch.
Receipt = tuple[int, int, int, int]


def format_receipt(seq: int, index: int, deliveries: int, epoch: int) -> str:
    return f"{seq}-{index}-{deliveries}-{epoch}"


def parse_receipt(text: object) -> Receipt | None:
    """Return the parsed receipt, or ``None`` when ``text`` is not one."""
    if not isinstance(text, str):
        return None
    match = _RECEIPT.fullmatch(text)
    if match is None:
        return None
    seq, index, deliveries, epoch = match.groups()
    return int(seq), int(index), int(deliveries), int(epoch)
