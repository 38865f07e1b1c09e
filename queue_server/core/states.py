"""The lease state machine of one message.

Per-message state lives in a ``bytearray`` per published batch, so states have
small integer codes (``MessageState.code``) next to their readable names.
Every change goes through a named ``Transition``; a move the table does not
list raises ``IllegalTransition``.
"""

from __future__ import annotations

from enum import Enum

from queue_server.errors import IllegalTransition


class MessageState(str, Enum):
    READY = "ready"
    DELAYED = "delayed"
    LEASED = "leased"
    ACKED = "acked"
    #: Moved to another queue: dead-lettered, or redriven out of a dead-letter queue.
    MOVED = "moved"
    #: Removed by retention or by deleting the queue.
    DROPPED = "dropped"

    @property
    def code(self) -> int:
        return _CODES[self]

    @property
    def live(self) -> bool:
        """True while the message still counts against its queue."""
        return self in (MessageState.READY, MessageState.DELAYED, MessageState.LEASED)


STATES: tuple[MessageState, ...] = tuple(MessageState)
_CODES = {state: index for index, state in enumerate(STATES)}

READY = MessageState.READY.code
DELAYED = MessageState.DELAYED.code
LEASED = MessageState.LEASED.code
ACKED = MessageState.ACKED.code
MOVED = MessageState.MOVED.code
DROPPED = MessageState.DROPPED.code
LIVE_CODES = frozenset({READY, DELAYED, LEASED})


class Transition(str, Enum):
    LEASE = "lease"
    ACK = "ack"
    #: Renew a lease; also leases again a message whose lease expired if no other consumer leased it since.
    EXTEND = "extend"
    NACK = "nack"
    #: Nack with a delay, or publish with one.
    DEFER = "defer"
    DUE = "due"
    EXPIRE = "expire"
    #: Dead-letter, or redrive out of a dead-letter queue.
    MOVE = "move"
    DROP = "drop"


_S = MessageState
_ALLOWED: dict[Transition, dict[MessageState, MessageState]] = {
    Transition.LEASE: {_S.READY: _S.LEASED},
    Transition.ACK: {_S.LEASED: _S.ACKED, _S.READY: _S.ACKED, _S.DELAYED: _S.ACKED},
    Transition.EXTEND: {_S.LEASED: _S.LEASED, _S.READY: _S.LEASED, _S.DELAYED: _S.LEASED},
    Transition.NACK: {_S.LEASED: _S.READY, _S.READY: _S.READY, _S.DELAYED: _S.READY},
    Transition.DEFER: {_S.LEASED: _S.DELAYED, _S.READY: _S.DELAYED, _S.DELAYED: _S.DELAYED},
    Transition.DUE: {_S.DELAYED: _S.READY},
    Transition.EXPIRE: {_S.LEASED: _S.READY},
    Transition.MOVE: {_S.READY: _S.MOVED, _S.LEASED: _S.MOVED, _S.DELAYED: _S.MOVED},
    Transition.DROP: {_S.READY: _S.DROPPED, _S.LEASED: _S.DROPPED, _S.DELAYED: _S.DROPPED},
}

#: ``TABLE[transition][from_code]`` is the target code, or -1 when the move is illegal.
TABLE: dict[Transition, tuple[int, ...]] = {
    transition: tuple(
        allowed[state].code if state in allowed else -1 for state in STATES
    )
    for transition, allowed in _ALLOWED.items()
}


def next_state(state: MessageState, transition: Transition) -> MessageState:
    """Return the state ``transition`` leads to from ``state``; raise ``IllegalTransition``."""
    target = TABLE[transition][state.code]
    if target < 0:
        raise IllegalTransition(
            f"transition {transition.value!r} is not allowed from state {state.value!r}"
        )
    return STATES[target]

