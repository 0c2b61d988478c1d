"""The handle other actors hold for a connection: who it is and a way to hand it frames.

Delivering never blocks. A full outbox means the client does not keep up: the connection
is told to close as a slow consumer instead of stalling the room that is broadcasting.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import trio


@attrs.define(eq=False, repr=False)
class Peer:
    id: str
    user_id: str
    username: str
    avatar_url: str | None
    is_service: bool
    _outbox: Any  # winkr.outbox.Outbox: send_nowait never blocks
    close: Callable[[str], None]  # ask the connection to close with a reason; never blocks

    def deliver(self, frame: str) -> bool:
        """Queue one encoded frame; ``False`` if the connection is gone or overflowing."""
        try:
            self._outbox.send_nowait(frame)
        except trio.WouldBlock:
            self.close("slow_consumer")
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def __repr__(self) -> str:
        return f"<Peer {self.id} user={self.user_id}>"
