"""Safety between users (contract §12): ``user:block``, ``user:unblock``, ``user:blocks``,
``message:report`` and ``user:settings`` (on the connection), ``conversation:close`` (in the
room).

A block and the closing of the pair's conversations are one store transaction (with their
webhook events); the rooms of the closed conversations then forget their members and typing
and tell both users' connections, and presence stops the pair's presence. Sends that reach
the store after that transaction are refused there (``NOT_FOUND``), whatever the room knew.
``block_user`` and ``unblock_user`` are shared with the server API (``winkr.api``).
"""
from __future__ import annotations

from collections.abc import Callable

from winkr.clock import iso
from winkr.errors import FORBIDDEN, NOT_FOUND, VALIDATION_ERROR, ProtocolError
from winkr.handlers.closing import announce_closed
from winkr.handlers.context import ConnectionContext, RoomCall, RoomContext
from winkr.protocol.requests import Empty, MessageReport, SettingsUpdate, UserRef
from winkr.protocol.webhook_data import (
    CONVERSATION_CLOSED,
    MESSAGE_REPORTED,
    USER_BLOCKED,
    conversation_closed_data,
    message_reported_data,
    user_blocked_data,
)
from winkr.protocol.wire import message_object, report_reply, settings_object
from winkr.records import BlockEntry, BlockResult, ClosedConversation, Report
from winkr.room import Closed, send_to_room
from winkr.services import Services
from winkr.store.safety import SERVICE_CLOSER
from winkr.store.store import Store
from winkr.store.webhook_outbox import enqueue

# --- operations shared with the server API ----------------------------------------------------


async def block_user(services: Services, blocker: str, blocked: str) -> BlockResult:
    """Block ``blocked`` for ``blocker``: stored with the closing of their open two-person
    conversations in one transaction; then presence and the rooms follow. Blocking again is
    a no-op. ``VALIDATION_ERROR`` for blocking yourself."""
    now, enabled = services.frames.now(), services.webhooks.events

    def work(store: Store) -> BlockResult:
        result = store.block(blocker, blocked, now)
        if result.created:
            enqueue(store, USER_BLOCKED, user_blocked_data(
                blocker, blocked, [c.id for c in result.closed], result.blocked_at), result.blocked_at, enabled)
            for closed in result.closed:
                enqueue(store, CONVERSATION_CLOSED, _closed_data(closed), closed.closed_at, enabled)
        return result

    result = await services.store.call(work)
    services.webhooks.nudge()
    if result.created:
        await services.presence.set_apart(blocker, blocked)
        for closed in result.closed:
            await send_to_room(services.hub.room, closed.id, Closed(closed.closed_at))
    return result


async def unblock_user(services: Services, blocker: str, blocked: str) -> float:
    """Remove the block (none: a no-op); returns ``unblocked_at``. Closed conversations stay
    closed; the pair hear of each other again if they still share an open conversation."""
    now = services.frames.now()

    def work(store: Store) -> tuple[bool, bool]:
        store.unblock(blocker, blocked)
        return store.is_blocked_pair(blocker, blocked), store.share_open_conversation(blocker, blocked)

    still_apart, contacts = await services.store.call(work)
    await services.presence.set_together(blocker, blocked, still_apart=still_apart, contacts=contacts)
    return now


def _closed_data(closed: ClosedConversation) -> dict[str, object]:
    return conversation_closed_data(closed.id, closed.closed_by, closed.closed_at)


def close_work(conversation_id: str, closed_by: str, now: float,
               enabled: frozenset[str]) -> Callable[[Store], ClosedConversation]:
    """Store work: close an open conversation and record ``conversation.closed`` (when
    ``enabled``); ``NOT_FOUND`` if it was closed meanwhile. Nudge the webhook sender after."""

    def work(store: Store) -> ClosedConversation:
        closed = store.close_conversation(conversation_id, closed_by, now)
        if closed is None:
            raise ProtocolError(NOT_FOUND, "conversation not found (it was closed)", field="conversation_id")
        enqueue(store, CONVERSATION_CLOSED, _closed_data(closed), closed.closed_at, enabled)
        return closed

    return work


# --- client events -----------------------------------------------------------------------------


async def block(conn: ConnectionContext, request: UserRef, ref: str | None) -> None:
    if request.user_id == conn.principal.user_id:
        raise ProtocolError(VALIDATION_ERROR, "you cannot block yourself", field="user_id")
    result = await block_user(conn.services, conn.principal.user_id, request.user_id)
    await conn.reply("user:blocked", {"user_id": request.user_id, "blocked_at": iso(result.blocked_at)}, ref)


async def unblock(conn: ConnectionContext, request: UserRef, ref: str | None) -> None:
    if request.user_id == conn.principal.user_id:
        raise ProtocolError(VALIDATION_ERROR, "you cannot unblock yourself", field="user_id")
    unblocked_at = await unblock_user(conn.services, conn.principal.user_id, request.user_id)
    await conn.reply("user:unblocked", {"user_id": request.user_id, "unblocked_at": iso(unblocked_at)}, ref)


async def list_blocks(conn: ConnectionContext, request: Empty, ref: str | None) -> None:
    """The caller's own blocks only (contract §17.3)."""
    user_id = conn.principal.user_id

    def work(store: Store) -> list[BlockEntry]:
        return store.blocks(user_id)

    entries = await conn.services.store.call(work)
    await conn.reply("user:blocks", {"blocks": [{"user_id": e.user_id, "blocked_at": iso(e.blocked_at)}
                                                for e in entries]}, ref)


async def report(conn: ConnectionContext, request: MessageReport, ref: str | None) -> None:
    """Keep a report with a snapshot of the message; works in a closed conversation too."""
    settings = conn.services.settings
    if request.note is not None and len(request.note) > settings.max_report_note_chars:
        raise ProtocolError(VALIDATION_ERROR, f"note must be at most {settings.max_report_note_chars} characters",
                            field="note")
    if request.plaintext is not None and len(request.plaintext) > settings.max_encrypted_chars:
        raise ProtocolError(VALIDATION_ERROR, f"plaintext must be at most {settings.max_encrypted_chars} "
                            "characters", field="plaintext")
    reporter, now, per_day = conn.principal.user_id, conn.services.frames.now(), settings.limits.reports_per_day
    enabled = conn.services.webhooks.events

    def work(store: Store) -> Report:
        made = store.report(reporter, request.conversation_id, request.message_id, request.reason, request.note,
                            request.plaintext, now, per_day)
        enqueue(store, MESSAGE_REPORTED, message_reported_data(
            made.id, made.reporter_id, made.reason, made.note, made.message.conversation_id,
            message_object(made.message), made.reported_at), made.reported_at, enabled)
        return made

    made = await conn.services.store.call(work)
    conn.services.webhooks.nudge()
    await conn.reply("message:reported", report_reply(made), ref)


async def update_settings(conn: ConnectionContext, request: SettingsUpdate, ref: str | None) -> None:
    """Store and apply the privacy settings for every connection of the user at once."""
    settings = await conn.services.presence.update_settings(conn.principal.user_id, request.read_receipts,
                                                            request.online_status)
    await conn.reply("user:settings_updated", {**settings_object(settings),
                                               "updated_at": iso(settings.updated_at or conn.services.frames.now())},
                     ref)


async def close_in_room(room: RoomContext, call: RoomCall) -> None:
    """``conversation:close`` (unmatch without blocking): two-person conversations only (a
    service account — the server API — may close any). The caller's reply is its
    ``conversation:closed`` with ``ref``."""
    peer = call.peer
    participants = room.authorize(peer)
    if not peer.is_service and len(participants) != 2:
        raise ProtocolError(FORBIDDEN, "only a two-person conversation can be closed", field="conversation_id")
    closed_by = SERVICE_CLOSER if peer.is_service else peer.user_id
    closed = await room.store.call(close_work(room.id, closed_by, room.frames.now(), room.webhooks.events))
    room.webhooks.nudge()
    await announce_closed(room, closed.closed_at, peer, call.ref)
    if closed.uncontacted:
        await room.presence.drop_contacts(closed.uncontacted)
    if call.outcome is not None:
        call.outcome.set(closed)
