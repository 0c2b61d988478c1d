"""What a client is told when it comes back: unread counts, and the delivery receipts that
its catching up produces for the senders."""
from __future__ import annotations

from typing import Any

from winkr.presence import delivered_frame
from winkr.store.store import Delivery, Store, UnreadSummary, last_message_summary


async def announce_deliveries(conn: Any, deliveries: list[Delivery]) -> None:
    """Send ``message:delivered`` to every connection of each message's sender (one hand-off
    to presence for the whole list)."""
    if deliveries:
        await conn.s.presence.send_each(
            (delivery.sender_id, delivered_frame(conn.s.frames, delivery)) for delivery in deliveries)


def _unread_and_deliver(user_id: str, now: float):  # type: ignore[no-untyped-def]
    def work(store: Store) -> tuple[list[UnreadSummary], list[Delivery]]:
        summaries = store.unread_summaries(user_id)
        lasts = [s.last_message for s in summaries if s.last_message is not None]
        return summaries, store.record_delivered(lasts, user_id, now)
    return work


async def send_unread_summary(conn: Any) -> None:
    """One ``conversation:unread`` per conversation with unread messages."""
    summaries, deliveries = await conn.s.store.call(
        _unread_and_deliver(conn.principal.user_id, conn.s.frames.now()))
    for summary in summaries:
        conn.reply("conversation:unread", {
            "conversation_id": summary.conversation_id, "unread_count": summary.unread_count,
            "last_message": last_message_summary(summary.last_message) if summary.last_message else None},
            None)
    await announce_deliveries(conn, deliveries)
