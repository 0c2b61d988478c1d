"""What a room does once its conversation is closed (contract §12): used by the room for a
close made elsewhere (a block) and by the ``conversation:close`` handler."""
from __future__ import annotations

from winkr.broker.events import CLOSED
from winkr.handlers.context import RoomContext
from winkr.peer import Peer
from winkr.protocol.wire import closed_data


async def announce_closed(room: RoomContext, closed_at: float, requester: Peer | None, ref: str | None) -> None:
    """Forget the room's members and typing (the typing ends silently), then tell every open
    connection of every participant, joined or not: ``conversation:closed``. The requester's
    own connection gets it with ``ref`` (its reply)."""
    participants = room.mark_closed()
    room.share(CLOSED, {"closed_at": closed_at})  # the other nodes' rooms forget it too
    data = closed_data(room.id, closed_at)
    if requester is not None:
        requester.deliver(room.frames.event("conversation:closed", data, ref))
    await room.presence.send_to_users(participants, room.frames.event("conversation:closed", data),
                                      except_connection=requester.id if requester is not None else None)
