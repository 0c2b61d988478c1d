"""The one table of client events: event name → request type → handler → where it runs.

To find where an event is handled, find its row. ``on_connection`` handlers run in the
connection actor that read the frame; room handlers run in the conversation's room actor
(``prepare``, when given, runs on the connection first: cheap checks and the content policy);
``in_room_batch`` handles a run of consecutive calls at once (group commit). ``cost`` is what
the event takes from the connection's inbound budget (``[limits] inbound_events_per_second``).
"""
from __future__ import annotations

from winkr.handlers import conversations, messages, safety, typing_indicator, users
from winkr.handlers.context import Route
from winkr.protocol.requests import (
    AuthRefresh,
    ConversationCreate,
    ConversationRef,
    Empty,
    MessageHistory,
    MessageRef,
    MessageReport,
    MessageSend,
    SettingsUpdate,
    UserRef,
    UserStatus,
)

ROUTES: dict[str, Route] = {route.event: route for route in (
    Route("message:send", MessageSend, in_room_batch=messages.send_run, prepare=messages.prepare_send),
    Route("message:read", MessageRef, in_room=messages.read),
    Route("message:delete", MessageRef, in_room=messages.delete),
    Route("message:history", MessageHistory, on_connection=messages.history, cost=2),
    Route("typing:start", ConversationRef, in_room=typing_indicator.typing_in_room,
          prepare=typing_indicator.check_typing_limit),
    Route("typing:stop", ConversationRef, in_room=typing_indicator.typing_in_room,
          prepare=typing_indicator.check_typing_limit),
    Route("conversation:join", ConversationRef, on_connection=conversations.join),
    Route("conversation:leave", ConversationRef, in_room=conversations.leave_in_room,
          prepare=conversations.forget_room),
    Route("conversation:create", ConversationCreate, on_connection=conversations.create, cost=2),
    Route("conversation:list", Empty, on_connection=conversations.list_, cost=10),
    Route("user:status", UserStatus, on_connection=users.status, cost=2),
    Route("auth:refresh", AuthRefresh, on_connection=users.refresh, cost=2),
    # Safety between users (contract §12).
    Route("user:block", UserRef, on_connection=safety.block, cost=5),
    Route("user:unblock", UserRef, on_connection=safety.unblock, cost=5),
    Route("user:blocks", Empty, on_connection=safety.list_blocks, cost=5),
    Route("conversation:close", ConversationRef, in_room=safety.close_in_room, cost=5),
    Route("message:report", MessageReport, on_connection=safety.report, cost=5),
    Route("user:settings", SettingsUpdate, on_connection=safety.update_settings, cost=5),
)}

EVENTS = tuple(ROUTES)
"""Every client event name, in table order."""
