"""The revocations actor: which users' tokens are refused (contract §13, ``revoke_tokens``).

Owns, per user, the moment their tokens were revoked: every token of that user issued
(``iat``) at or before it, or without ``iat``, is refused at the handshake (HTTP 401) and by
``auth:refresh`` (``UNAUTHORIZED``). The times live in the database (``token_revocations``),
so they hold across restarts; this actor loads them at start and keeps them in memory, so a
handshake costs a dictionary lookup, not a database round trip. A revocation is answered
only once it is durable, and a check that arrives after it sees it (one inbox, in order).
Memory: one float per user ever revoked.
"""
from __future__ import annotations

from functools import partial

import attrs
import trio

from winkr.actor import Reply
from winkr.auth import Principal
from winkr.broker.base import BROADCAST_TOPIC, Broker, BusEvent
from winkr.broker.events import REVOKED
from winkr.store.store import Store
from winkr.store.writer import StoreHandle


@attrs.frozen
class _Check:
    principal: Principal
    reply: Reply[bool]


@attrs.frozen
class _Revoke:
    user_id: str
    at: float
    reply: Reply[None]


@attrs.frozen
class _RevokedElsewhere:
    user_id: str
    at: float


RevocationRequest = _Check | _Revoke | _RevokedElsewhere


def is_revoked(revoked_at: float | None, principal: Principal) -> bool:
    """The rule: refused when revoked at or after the token's ``iat`` (or it has none)."""
    if revoked_at is None:
        return False
    return principal.issued_at is None or principal.issued_at <= revoked_at


class RevocationsHandle:
    def __init__(self, inbox: trio.MemorySendChannel[RevocationRequest]) -> None:
        self._inbox = inbox

    async def is_revoked(self, principal: Principal) -> bool:
        """Whether ``principal``'s token was revoked."""
        reply: Reply[bool] = Reply()
        await self._inbox.send(_Check(principal, reply))
        return await reply.wait()

    async def revoke(self, user_id: str, at: float) -> None:
        """Refuse every token of ``user_id`` issued at or before ``at``; returns once stored.
        Cancelling the wait does not cancel the revocation."""
        reply: Reply[None] = Reply()
        await self._inbox.send(_Revoke(user_id, at, reply))
        await reply.wait()

    async def revoked_elsewhere(self, user_id: str, at: float) -> None:
        """Another node stored a revocation: refuse those tokens here too."""
        await self._inbox.send(_RevokedElsewhere(user_id, at))


async def run_revocations(store: StoreHandle, *, inbox_size: int = 1024, broker: Broker | None = None,
                          task_status: trio.TaskStatus[RevocationsHandle] = trio.TASK_STATUS_IGNORED) -> None:
    """Load the stored revocations, then answer until cancelled. With a shared ``broker``, a
    stored revocation is published to every node (topic ``all``)."""
    revoked: dict[str, float] = await store.call(Store.token_revocations)
    send, receive = trio.open_memory_channel[RevocationRequest](inbox_size)
    task_status.started(RevocationsHandle(send))
    async with receive:
        async for request in receive:
            match request:
                case _Check(principal=principal, reply=reply):
                    reply.set(is_revoked(revoked.get(principal.user_id), principal))
                case _Revoke(user_id=user_id, at=at, reply=reply):
                    try:
                        await store.call(partial(Store.revoke_tokens, user_id=user_id, at=at))
                    except Exception as exc:  # noqa: BLE001 - the asker learns it; we go on
                        reply.fail(exc)
                        continue
                    revoked[user_id] = max(at, revoked.get(user_id, at))
                    if broker is not None and broker.shared:
                        broker.publish([BusEvent(BROADCAST_TOPIC, REVOKED, {"user_id": user_id, "at": at})])
                    reply.set(None)
                case _RevokedElsewhere(user_id=user_id, at=at):
                    revoked[user_id] = max(at, revoked.get(user_id, at))
