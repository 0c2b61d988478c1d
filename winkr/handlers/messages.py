"""message:send, message:read, message:delete (in the room) and message:history (on the
connection).

The life of a send: the connection checks it cheaply first (its own message budget), then
runs the content policy, and hands it to the room; the room commits a run of sends as one
store request, acknowledges each to its sender, broadcasts it to the joined connections in
commit order, and hands the rest (unread counts, receipts for connections outside the room)
to presence.
"""
from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from functools import partial

from winkr.actor import Frames
from winkr.broker.events import DELETED
from winkr.clock import iso
from winkr.errors import ProtocolError
from winkr.handlers.catchup import announce_deliveries
from winkr.handlers.context import ConnectionContext, RoomCall, RoomContext
from winkr.outbox import deferred_writes
from winkr.peer import Peer
from winkr.policy import CheckedMessage, check_message
from winkr.presence import Published
from winkr.protocol.requests import MessageHistory, MessageRef, MessageSend
from winkr.protocol.webhook_data import MESSAGE_CREATED, message_created_data
from winkr.protocol.wire import Json, delivered_data, message_object, sender_object, unread_data
from winkr.ratelimit import Rate
from winkr.records import Delivery, SendItem, SendResult, StoredMessage
from winkr.store.store import Store
from winkr.store.webhook_outbox import enqueue


async def prepare_send(conn: ConnectionContext, request: MessageSend) -> CheckedMessage:
    """On the connection: the cheap limit pre-check, then the content policy (the costly part)."""
    conn.check_send_budget()
    checked = check_message(request.type, request.content, request.metadata,
                            is_service=conn.principal.is_service, settings=conn.services.policy)
    conn.count_send()
    return checked


async def send_run(room: RoomContext, calls: list[RoomCall]) -> None:
    """In the room: commit a run of sends as one store request, then fan each out in commit
    order."""
    allowed: list[RoomCall] = []
    for call in calls:
        try:
            room.authorize(call.peer)
            allowed.append(call)
        except ProtocolError as exc:
            _reply_error(room, call, exc)
    if not allowed:
        return
    # The joined recipients get the message as soon as it commits: record those deliveries in
    # the same transaction (membership cannot change while this run is in flight).
    joined_users = {member.user_id for member in room.members()}
    items = []
    senders = []
    for call in allowed:
        assert isinstance(call.request, MessageSend) and isinstance(call.prepared, CheckedMessage)
        checked, peer = call.prepared, call.peer
        recipients = joined_users - {peer.user_id}
        items.append(SendItem(peer.user_id, checked.type, checked.content, checked.metadata,
                              call.request.client_message_id,
                              tuple(sorted(recipients)) if len(recipients) > 1 else tuple(recipients),
                              counted=call.outcome is None))  # the server API's system messages are not counted
        senders.append(sender_object(peer.user_id, peer.username, peer.avatar_url))
    # (asked only when message.created is on: most servers send no webhooks)
    unconnected = await _unconnected(room, joined_users, allowed) if room.webhooks.wants(MESSAGE_CREATED) \
        else _NOBODY
    results, intervening = await room.store.call(partial(
        _insert_and_notify, conversation_id=room.id, items=items, now=room.frames.now(), rates=room.message_limits(),
        senders=senders, unconnected=unconnected, enabled=room.webhooks.events, seen_upto=room.delivered_seq))
    if unconnected:
        room.webhooks.nudge()
    if intervening:  # other nodes committed these before our run: they go out first (seq order)
        await room.deliver_committed([(m, sender_object(m.sender_id, username or m.sender_id, avatar))
                                      for m, username, avatar in intervening])
    fanned_out: list[tuple[RoomCall, SendResult]] = []
    shared = []
    # The run's frames leave in one write per connection, from this task, when the sockets take
    # them now (winkr.outbox: no wake-up of each connection's writer).
    with deferred_writes():
        for call, sender, result in zip(allowed, senders, results):
            if isinstance(result, ProtocolError):
                _reply_error(room, call, result)
                continue
            if _fan_out(room, call, result, sender):
                fanned_out.append((call, result))
                shared.append((result.message, sender))
    room.share_messages(shared)
    # One hand-off for the whole run, when presence has something to do with it (what it gets
    # is built only then: the usual run has every connection in the room).
    if fanned_out and room.presence.follow_up_needed(room.participant_ids, room.members()):
        joined = frozenset(m.id for m in room.members())  # the loop above did not wait: still the same
        await room.presence.published([Published(result.message, room.authorize(call.peer), joined,
                                                 result.deliveries) for call, result in fanned_out])


async def _unconnected(room: RoomContext, joined_users: set[str], calls: list[RoomCall]) -> frozenset[str]:
    """The participants with no open connection right now (asked when ``message.created`` is
    on): the ones a push notification is for (contract §14). Presence is asked once per run, only about
    participants neither joined here nor sending (those are connected by definition). Asked just
    before the commit: someone connecting within that millisecond gets one push too many."""
    candidates = set(room.participant_ids) - joined_users - {call.peer.user_id for call in calls}
    if not candidates:
        return frozenset()
    return frozenset(candidates - await room.presence.connected(candidates))


_NOBODY: frozenset[str] = frozenset()
Intervening = list[tuple[StoredMessage, str | None, str | None]]


def _insert_and_notify(store: Store, conversation_id: str, items: Sequence[SendItem], now: float,
                       rates: tuple[Rate, ...], senders: Sequence[Json], unconnected: frozenset[str],
                       enabled: Collection[str], seen_upto: int) -> tuple[list[SendResult | ProtocolError],
                                                                          Intervening]:
    """In the writer's transaction: the run's inserts, and one ``message.created`` per new
    message for each participant in ``unconnected`` other than its sender, so an event exists
    exactly when its message does. Also the messages other nodes committed after ``seen_upto``
    (the room's position) and before the run's first: read under the conversation's lock, so
    the room can send them first and every client still sees ``seq`` ascending without a gap."""
    results = store.insert_messages(conversation_id, items, now, rates)
    first_new = None
    for item, sender, result in zip(items, senders, results):
        if isinstance(result, ProtocolError) or result.duplicate:
            continue
        if first_new is None:
            first_new = result.message.seq
        if not unconnected:
            continue
        for recipient in sorted(unconnected - {item.sender_id}):
            enqueue(store, MESSAGE_CREATED, message_created_data(
                recipient, result.message, sender, store.unread_count(conversation_id, recipient)), now, enabled)
    intervening: Intervening = []
    if first_new is not None and first_new > seen_upto + 1:
        intervening = store.messages_after(conversation_id, seen_upto, first_new - seen_upto - 1)
    return results, intervening


def message_frames(frames: Frames, message: StoredMessage, sender: Json, ref: str | None) -> tuple[str, str]:
    """(the sender's acknowledgement, with ``ref``; everyone else's ``message:new``): the
    message encoded once for both."""
    new = frames.event("message:new", {"message": message_object(message), "sender": sender})
    return frames.with_ref(new, "message:new", ref), new


def _fan_out(room: RoomContext, call: RoomCall, result: SendResult, sender: Json) -> bool:
    """Acknowledge to the sender, broadcast to the joined connections; ``False`` for a
    duplicate (answered to its sender only: nothing for presence or the other nodes)."""
    peer = call.peer
    frames = room.frames
    ack, new = message_frames(frames, result.message, sender, call.ref)
    peer.deliver(ack)
    if call.outcome is not None:
        call.outcome.set(result)
    if result.duplicate:  # answered to the sender only (contract §11.15)
        return False
    room.fanned_out(result.message.seq)
    room.broadcast(new, skip=peer)
    if result.deliveries:
        # The receipts of the deliveries recorded with the message go to the sender's joined
        # connections in this same step, so the acknowledgement and the receipt leave in one
        # write; presence sends them to the sender's other connections (issue 10, proposal 1).
        receipts = [frames.event("message:delivered", delivered_data(delivery)) for delivery in result.deliveries]
        for member in room.members():
            if member.user_id == peer.user_id:
                for receipt in receipts:
                    member.deliver(receipt)
    if frames.metrics is not None and call.received_at is not None:
        frames.metrics.fanout_seconds.observe(time.perf_counter() - call.received_at)
    return True


async def read(room: RoomContext, call: RoomCall) -> None:
    """In the room: move the reader's read position; tell the reader, the senders whose
    messages became read, and the reader's other connections (their unread count)."""
    peer, request = call.peer, call.request
    assert isinstance(request, MessageRef)
    room.authorize(peer)
    result = await room.store.call(partial(
        Store.read_up_to, conversation_id=room.id, reader=peer.user_id,
        message_id_=request.message_id, now=room.frames.now()))
    data = {"message_id": request.message_id, "conversation_id": room.id,
            "reader_id": peer.user_id, "viewed_at": iso(result.viewed_at)}
    peer.deliver(room.frames.event("message:viewed", data, call.ref))
    if result.newly_read_senders:
        # A later read covers an earlier one still waiting: one key per (conversation, reader).
        # Presence leaves out senders when either side has read receipts off (contract §12).
        await room.presence.send_receipt(peer.user_id, result.newly_read_senders,
                                         room.frames.event("message:viewed", data),
                                         key=("viewed", room.id, peer.user_id))
        await room.presence.send_to_users(
            (peer.user_id,), room.frames.event("conversation:unread", unread_data(
                room.id, result.unread_count, result.last_message)),
            except_connection=peer.id, key=("unread", room.id))
    if result.ephemeral_expiries:
        room.nudge_reaper()


async def delete(room: RoomContext, call: RoomCall) -> None:
    """In the room: erase a message (a tombstone stays) and announce it to the room."""
    peer, request = call.peer, call.request
    assert isinstance(request, MessageRef)
    room.authorize(peer)
    deleted_at = await room.store.call(partial(
        Store.delete_message, conversation_id=room.id, message_id_=request.message_id,
        deleted_by=peer.user_id, now=room.frames.now()))
    announce_deleted(room, request.message_id, peer.user_id, deleted_at, peer, call.ref)


def announce_deleted(room: RoomContext, message_id: str, deleted_by: str, deleted_at: float,
                     requester: Peer | None, ref: str | None, *, share: bool = True) -> None:
    """``message:deleted`` to the room; the requester (joined or not) gets it with its ``ref``;
    with ``share``, the other nodes' rooms announce it too."""
    data = {"message_id": message_id, "conversation_id": room.id, "deleted_by": deleted_by,
            "deleted_at": iso(deleted_at)}
    if share:
        room.share(DELETED, {"message_id": message_id, "deleted_by": deleted_by, "deleted_at": deleted_at})
    if requester is not None:
        requester.deliver(room.frames.event("message:deleted", data, ref))
    room.broadcast(room.frames.event("message:deleted", data), skip=requester)


async def history(conn: ConnectionContext, request: MessageHistory, ref: str | None) -> None:
    """On the connection: a page of history; the messages it shows the reader for the first
    time count as delivered."""
    principal, now = conn.principal, conn.services.frames.now()
    user_id = principal.user_id

    def work(store: Store) -> tuple[list[StoredMessage], bool, list[Delivery]]:
        participants = store.authorize(request.conversation_id, user_id, principal.is_service)
        messages, has_more = store.history(request.conversation_id, user_id, request.before_seq,
                                           request.after_seq, request.limit)
        if user_id not in participants:  # a service account reading is not a delivery
            return messages, has_more, []
        return messages, has_more, store.record_delivered(messages, user_id, now)

    messages, has_more, deliveries = await conn.services.store.call(work)
    await conn.reply("message:history", {"conversation_id": request.conversation_id,
                                         "messages": [message_object(m) for m in messages],
                                         "has_more": has_more}, ref)
    await announce_deliveries(conn, deliveries)


def _reply_error(room: RoomContext, call: RoomCall, exc: ProtocolError) -> None:
    if call.outcome is not None:
        call.outcome.fail(exc)
    call.peer.deliver(room.frames.error(exc, call.route.event, call.ref))
