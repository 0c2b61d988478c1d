"""What a handler may use: the two small interfaces handlers are written against.

A client event is handled either **on the connection** that received it (the handler runs in
the connection actor's task) or **in the conversation's room** (it runs in the room actor's
task, which owns the room's members and typing state and orders the conversation's events).
Handlers never see the actors' internals, only these protocols; ``winkr.connection`` and
``winkr.room`` implement them.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import attrs

from winkr.actor import Frames, Reply
from winkr.auth import Principal
from winkr.peer import Peer
from winkr.protocol.requests import ClientRequest
from winkr.ratelimit import Rate
from winkr.records import StoredMessage

if TYPE_CHECKING:
    from winkr.presence import PresenceHandle
    from winkr.services import Services
    from winkr.store.writer import StoreHandle
    from winkr.webhooks import WebhookHandle

Json = dict[str, Any]


class ConnectionContext(Protocol):
    """The connection that received the request."""

    @property
    def id(self) -> str: ...

    @property
    def principal(self) -> Principal: ...

    @property
    def peer(self) -> Peer: ...

    @property
    def services(self) -> Services: ...

    async def reply(self, event: str, data: Json, ref: str | None) -> None:
        """Queue a direct reply; waits while the client's outbox is full (backpressure)."""

    async def to_room(self, conversation_id: str, call: RoomCall) -> None:
        """Hand a call to the conversation's room (waking it if needed)."""

    def check_can_join(self, conversation_id: str) -> None:
        """Raise ``ProtocolError`` if this connection may not join one more room."""

    def joined_room(self, conversation_id: str) -> bool:
        """Record a join of the room (asked or accepted); False when it was recorded already.
        A recorded room hears ``Depart`` when the connection ends."""

    def left_room(self, conversation_id: str) -> None:
        """Record that this connection left the room."""

    def refresh_principal(self, principal: Principal) -> None:
        """Adopt a refreshed token: its expiry becomes the connection's deadline."""

    def charge(self, units: int) -> None:
        """Take ``units`` more of the inbound budget for work whose cost showed only once done
        (a long list): the connection's next frames wait until it is repaid."""

    def check_send_budget(self) -> None:
        """Raise ``RATE_LIMITED`` when this connection alone is already over a message limit."""

    def count_send(self) -> None:
        """Count one message forwarded to the store (the pre-check's local mirror)."""


class RoomContext(Protocol):
    """The room of one conversation, as its handlers see it."""

    @property
    def id(self) -> str: ...

    @property
    def frames(self) -> Frames: ...

    @property
    def store(self) -> StoreHandle: ...

    @property
    def presence(self) -> PresenceHandle: ...

    @property
    def webhooks(self) -> WebhookHandle: ...

    @property
    def participant_ids(self) -> tuple[str, ...]:
        """The participants (empty for a conversation that does not exist)."""

    def authorize(self, peer: Peer) -> tuple[str, ...]:
        """The participants, if ``peer`` may act here; ``NOT_FOUND`` / ``FORBIDDEN`` otherwise."""

    def members(self) -> Iterable[Peer]:
        """The joined connections."""

    def add_member(self, peer: Peer) -> None:
        """Join ``peer``; ``CONVERSATION_FULL`` when the room is full."""

    def remove_member(self, peer: Peer) -> None:
        """Leave (and stop ``peer``'s user typing if it was)."""

    def set_typing(self, peer: Peer, is_typing: bool) -> None:
        """Record a typing change; broadcasts only a change of state."""

    def broadcast(self, frame: str, *, skip: Peer | None = None, skip_user: str | None = None) -> None:
        """Deliver ``frame`` to every joined connection but ``skip`` and ``skip_user``'s."""

    def nudge_reaper(self) -> None:
        """An ephemeral message got a deadline."""

    def message_limits(self) -> tuple[Rate, ...]:
        """The message rate limits the store counts each send against."""

    @property
    def delivered_seq(self) -> int:
        """The newest ``seq`` this room has fanned out to its joined connections."""

    def fanned_out(self, seq: int) -> None:
        """The room's own send at ``seq`` (``delivered_seq + 1``) went out."""

    async def deliver_committed(self, messages: list[tuple[StoredMessage, Json]]) -> None:
        """Fan out (message, sender object) pairs committed by other nodes, in ``seq`` order."""

    def share(self, kind: str, data: Json) -> None:
        """Publish an event of this room to the other nodes (never waits)."""

    def share_messages(self, messages: list[tuple[StoredMessage, Json]]) -> None:
        """Publish this node's new messages (with their sender objects) to the other nodes."""

    def mark_closed(self) -> tuple[str, ...]:
        """The conversation is closed: forget members and typing, refuse everything from now
        on (``NOT_FOUND``); returns the participants."""


class RoomCall(NamedTuple):
    """A client request on its way to (and handled in) a room. (A NamedTuple, immutable and
    read-only for mypy like a frozen attrs class, but built as one tuple instead of a
    ``object.__setattr__`` per field: one per message, 8.8 k -> 3.8 k instructions.)"""

    route: Route
    peer: Peer
    request: ClientRequest
    ref: str | None
    prepared: object = None  # what the route's ``prepare`` made of it (a checked message)
    received_at: float | None = None  # time.perf_counter() when the frame was read (the send->ack metric)
    # For callers that wait for the result: join (True/False); the server API (the handler's
    # result record, or the ProtocolError it failed with).
    outcome: Reply[Any] | None = None


ConnectionHandler = Callable[[ConnectionContext, Any, "str | None"], Awaitable[None]]
"""Runs on the connection: ``(connection, request, ref)``."""
RoomHandler = Callable[[RoomContext, RoomCall], Awaitable[None]]
"""Runs in the room for one call."""
RoomBatchHandler = Callable[[RoomContext, list[RoomCall]], Awaitable[None]]
"""Runs in the room for a run of consecutive calls of the same event (group commit)."""
Prepare = Callable[[ConnectionContext, Any], Awaitable[object]]
"""Runs on the connection before the call goes to the room: checks, and what the room needs."""


@attrs.frozen
class Route:
    """Where one client event is handled. Exactly one of ``on_connection``, ``in_room`` and
    ``in_room_batch`` is set; a room route's ``conversation_id`` names the room."""

    event: str
    request_type: type[ClientRequest]
    on_connection: ConnectionHandler | None = None
    in_room: RoomHandler | None = None
    in_room_batch: RoomBatchHandler | None = None
    prepare: Prepare | None = None  # room routes: runs on the connection first
    cost: int = 1  # units of the connection's inbound budget

    @property
    def where(self) -> str:
        """``"connection"`` or ``"room"`` (for the docs and the reader)."""
        return "connection" if self.on_connection is not None else "room"
