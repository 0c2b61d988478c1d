"""The handle other actors hold for a connection: who it is and its mailbox.

Everything another actor may do to a connection goes through the connection's outbox:
hand it a frame (never blocks; see ``winkr.outbox`` for the flow-control policy) or ask it
to close. The connection alone acts on both.
"""
from __future__ import annotations

from collections.abc import Set

import attrs

from winkr.outbox import CoalesceKey, Outbox


@attrs.define(eq=False, repr=False)
class Peer:
    id: str
    user_id: str
    username: str
    avatar_url: str | None
    is_service: bool
    _outbox: Outbox
    # The conversations this connection has joined: a read-only view of the connection's own
    # set (presence on another node's behalf skips them: their room delivers to them).
    joined: Set[str] = frozenset()
    # Set when the connection tells presence it is gone (PresenceHandle.disconnect), before
    # presence forgets it: a room may still list it until it reads the connection's Depart.
    leaving: bool = False

    def deliver(self, frame: str, key: CoalesceKey | None = None) -> bool:
        """Queue one encoded frame (replacing a waiting one with the same ``key``); ``False``
        if the connection is closing, gone or too slow."""
        return self._outbox.deliver(frame, key)

    def request_close(self, reason: str) -> None:
        """Ask the connection to close with ``reason`` (a key of the close-code table)."""
        self._outbox.request_close(reason)

    def __repr__(self) -> str:
        return f"<Peer {self.id} user={self.user_id}>"
