"""What a client is told when it comes back: unread counts, and the delivery receipts that
its catching up produces for the senders."""
from __future__ import annotations

from collections.abc import Iterable

from winkr.actor import Frames
from winkr.handlers.context import ConnectionContext
from winkr.protocol.wire import delivered_data, unread_data
from winkr.records import Delivery, UnreadSummary
from winkr.store.store import Store


def delivered_frames(frames: Frames, deliveries: Iterable[Delivery]) -> list[tuple[str, str]]:
    """(sender, ``message:delivered`` frame) for each delivery, for ``presence.send_each``."""
    return [(delivery.sender_id, frames.event("message:delivered", delivered_data(delivery)))
            for delivery in deliveries]


async def announce_deliveries(conn: ConnectionContext, deliveries: list[Delivery]) -> None:
    """``message:delivered`` to every connection of each message's sender (one hand-off to
    presence for the whole list)."""
    if deliveries:
        await conn.services.presence.send_each(delivered_frames(conn.services.frames, deliveries))


async def send_unread_summary(conn: ConnectionContext) -> None:
    """One ``conversation:unread`` per conversation with unread messages. The frames are the
    connection's own, so they wait for room in its outbox: a user with thousands of unread
    conversations gets them all at the pace the client reads, never a ``slow_consumer``."""
    user_id, now = conn.principal.user_id, conn.services.frames.now()

    def work(store: Store) -> tuple[list[UnreadSummary], list[Delivery]]:
        summaries = store.unread_summaries(user_id)
        lasts = [s.last_message for s in summaries if s.last_message is not None]
        return summaries, store.record_delivered(lasts, user_id, now)

    summaries, deliveries = await conn.services.store.call(work)
    for summary in summaries:
        await conn.reply("conversation:unread",
                         unread_data(summary.conversation_id, summary.unread_count, summary.last_message), None)
    await announce_deliveries(conn, deliveries)
