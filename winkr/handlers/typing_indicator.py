"""typing:start and typing:stop: no success reply, only an error when refused."""
from __future__ import annotations

from typing import Any

from winkr.protocol.requests import ConversationRef
from winkr.ratelimit import Rate, rate_limited
from winkr.room import Typing


async def _typing(conn: Any, request: ConversationRef, ref: str | None, is_typing: bool) -> None:
    rate = Rate(conn.s.settings.limits.typing_per_minute, "minute")
    if rate.count:
        retry_after = await conn.s.limiter.hit(f"typing\x1f{conn.principal.user_id}", rate)
        if retry_after:
            raise rate_limited(rate, retry_after, "typing events")
    await conn.to_room(request.conversation_id, Typing(conn.peer, is_typing, ref))


async def start(conn: Any, request: ConversationRef, ref: str | None) -> None:
    await _typing(conn, request, ref, True)


async def stop(conn: Any, request: ConversationRef, ref: str | None) -> None:
    await _typing(conn, request, ref, False)
