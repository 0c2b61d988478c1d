"""typing:start and typing:stop: no success reply, only an error when refused."""
from __future__ import annotations

from winkr.handlers.context import ConnectionContext, RoomCall, RoomContext
from winkr.protocol.requests import ConversationRef
from winkr.ratelimit import Rate, rate_limited


async def check_typing_limit(conn: ConnectionContext, request: ConversationRef) -> None:
    """On the connection: both starts and stops count toward the typing limit (§11.4)."""
    rate = Rate(conn.services.settings.limits.typing_per_minute, "minute")
    if rate.count:
        retry_after = await conn.services.limiter.hit(f"typing\x1f{conn.principal.user_id}", rate)
        if retry_after:
            raise rate_limited(rate, retry_after, "typing events")


async def typing_in_room(room: RoomContext, call: RoomCall) -> None:
    room.authorize(call.peer)
    room.set_typing(call.peer, call.route.event == "typing:start")
