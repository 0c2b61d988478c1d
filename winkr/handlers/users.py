"""user:status and auth:refresh."""
from __future__ import annotations

from winkr.clock import iso
from winkr.errors import FORBIDDEN, UNAUTHORIZED, ProtocolError
from winkr.handlers.context import ConnectionContext
from winkr.protocol.requests import AuthRefresh, UserStatus
from winkr.ratelimit import Rate, rate_limited


async def status(conn: ConnectionContext, request: UserStatus, ref: str | None) -> None:
    """Each change reaches every contact: the changes are limited per user (all connections)."""
    rate = Rate(conn.services.settings.limits.status_changes_per_minute, "minute")
    if rate.count and (wait := await conn.services.limiter.hit(f"status\x1f{conn.principal.user_id}", rate)):
        raise rate_limited(rate, wait, "status changes")
    updated_at = await conn.services.presence.set_status(conn.peer, request.status)
    await conn.reply("user:status_updated", {"status": request.status, "updated_at": iso(updated_at)}, ref)


async def refresh(conn: ConnectionContext, request: AuthRefresh, ref: str | None) -> None:
    """Adopt a new token for the same user; a refused one changes nothing."""
    principal = conn.services.verifier.verify(request.token, conn.services.frames.now())  # UNAUTHORIZED if bad
    if principal.user_id != conn.principal.user_id:
        raise ProtocolError(FORBIDDEN, "the new token is for another user", field="token")
    if await conn.services.revocations.is_revoked(principal):
        raise ProtocolError(UNAUTHORIZED, "this token has been revoked: get a new one")  # as any refused token
    conn.refresh_principal(principal)
    await conn.reply("auth:refreshed", {"expires_at": iso(principal.expires_at)}, ref)
