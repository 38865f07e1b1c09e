"""One published batch: the in-memory index entry of one write-ahead log record.

A batch keeps a few bytes per message (state, delivery count, body offset) and
no Python object per message, so a large backlog costs little memory. Bodies
stay in the log at ``location``, a value that only the storage layer reads.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from queue_server.core.states import DELAYED, READY

#: Message keys pack (batch sequence, index) into one int; a batch has fewer than 2**20 messages.
INDEX_BITS = 20
INDEX_MASK = (1 << INDEX_BITS) - 1


def message_key(seq: int, index: int) -> int:
    return (seq << INDEX_BITS) | index


def split_key(key: int) -> tuple[int, int]:
    return key >> INDEX_BITS, key & INDEX_MASK


def format_message_id(seq: int, index: int) -> str:
    return f"{seq}-{index}"


@dataclass(frozen=True, slots=True)
class DeadLetterOrigin:
    """Origin of a dead-lettered message, kept with its copy in the dead-letter queue."""

    queue: str
    message_id: str
    deliveries: int
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "id": self.message_id,
            "deliveries": self.deliveries,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DeadLetterOrigin":
        return cls(data["queue"], data["id"], int(data["deliveries"]), data.get("reason"))


class Batch:
    """Messages published together, with per-message state in compact arrays.

    ``offsets`` has ``count + 1`` entries: message ``i``'s body is bytes
    ``offsets[i]:offsets[i + 1]`` of the batch's body section.
    """

    __slots__ = (
        "seq",
        "published_at",
        "offsets",
        "states",
        "deliveries",
        "live",
        "next_fresh",
        "location",
        "origins",
        "_published_text",
    )

    def __init__(
        self,
        seq: int,
        published_at: float,
        offsets: array[int],
        location: Any,
        *,
        delayed: frozenset[int] = frozenset(),
        origins: list[DeadLetterOrigin] | None = None,
    ) -> None:
        count = len(offsets) - 1
        self.seq = seq
        self.published_at = published_at
        self.offsets = offsets
        self.states = bytearray([READY]) * count
        for index in delayed:
            self.states[index] = DELAYED
        self.deliveries = array("I", bytes(4 * count))
        self.live = count
        #: Messages below this index were handed out once already (or skipped as not ready).
        self.next_fresh = 0
        self.location = location
        self.origins = origins
        self._published_text: str | None = None

    @property
    def count(self) -> int:
        return len(self.states)

    @property
    def body_bytes(self) -> int:
        return self.offsets[-1] - self.offsets[0]

    def size(self, index: int) -> int:
        return self.offsets[index + 1] - self.offsets[index]

    @property
    def published_text(self) -> str:
        """``published_at`` as RFC 3339 UTC with microseconds, cached."""
        if self._published_text is None:
            moment = datetime.fromtimestamp(self.published_at, timezone.utc)
            self._published_text = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return self._published_text

    def __repr__(self) -> str:
        return f"Batch(seq={self.seq}, count={self.count}, live={self.live})"
