"""user:status and auth:refresh."""
from __future__ import annotations

from typing import Any

from winkr.clock import iso
from winkr.errors import FORBIDDEN, ProtocolError
from winkr.protocol.requests import AuthRefresh, UserStatus


async def status(conn: Any, request: UserStatus, ref: str | None) -> None:
    updated_at = await conn.s.presence.set_status(conn.peer, request.status)
    conn.reply("user:status_updated", {"status": request.status, "updated_at": iso(updated_at)}, ref)


async def refresh(conn: Any, request: AuthRefresh, ref: str | None) -> None:
    principal = conn.s.verifier.verify(request.token, conn.s.frames.now())  # UNAUTHORIZED if bad
    if principal.user_id != conn.principal.user_id:
        raise ProtocolError(FORBIDDEN, "the new token is for another user", field="token")
    conn.principal = principal
    conn.set_expiry(principal.expires_at)
    conn.reply("auth:refreshed", {"expires_at": iso(principal.expires_at)}, ref)
