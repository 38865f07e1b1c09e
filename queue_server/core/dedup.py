"""The dedup index: idempotency keys seen within the dedup window."""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Sequence
from itertools import repeat

from queue_server.core.batch import message_key


class DedupIndex:
    """Idempotency keys of recent batches, as 64-bit hashes, for ``window_s`` seconds.

    To keep memory per key small, the dict maps each hash to its batch's sequence
    number (one int object shared by the whole batch). The message index is looked
    up in the batch's hash array only when a duplicate is found.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._batch_of: dict[int, int] = {}
        self._batches: dict[int, tuple[array[int], array[int]]] = {}
        self._expiry: deque[tuple[float, int]] = deque()

    def __len__(self) -> int:
        return len(self._batch_of)

    def find(self, hashed: int) -> int | None:
        """Return the message key first published with this key hash, or ``None``."""
        seq = self._batch_of.get(hashed)
        if seq is None:
            return None
        indexes, hashes = self._batches[seq]
        return message_key(seq, indexes[hashes.index(hashed)])

    def add(self, seq: int, indexes: Sequence[int], hashes: Sequence[int], published_at: float) -> None:
        """Remember the key hashes of batch ``seq`` (message ``indexes[i]`` has ``hashes[i]``).

        They are forgotten at ``published_at + window_s``.
        """
        if not hashes:
            return
        index_table = indexes if isinstance(indexes, array) else array("I", indexes)
        hash_table = hashes if isinstance(hashes, array) else array("Q", hashes)
        self._batches[seq] = (index_table, hash_table)
        self._batch_of.update(zip(hash_table, repeat(seq)))
        self._expiry.append((published_at + self.window_s, seq))

    def remove(self, seq: int) -> None:
        """Forget the keys of batch ``seq`` (a publish that was not logged)."""
        entry = self._batches.pop(seq, None)
        if entry is None:
            return
        for hashed in entry[1]:
            if self._batch_of.get(hashed) == seq:
                del self._batch_of[hashed]

    def expire(self, now: float) -> None:
        """Forget keys whose window ended at or before ``now``."""
        while self._expiry and self._expiry[0][0] <= now:
            _, seq = self._expiry.popleft()
            self.remove(seq)
