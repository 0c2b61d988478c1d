"""Where each client event is handled: one function per event, grouped by subject.

A handler receives the connection, the validated request (``winkr.protocol.requests``) and
the client's ``ref``. Conversation events are handed to the conversation's room actor, which
replies; the rest ask the store or the presence actor and reply themselves.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from winkr.handlers import conversations, messages, typing_indicator, users

Handler = Callable[[Any, Any, "str | None"], Awaitable[None]]

HANDLERS: dict[str, Handler] = {
    "message:send": messages.send,
    "message:read": messages.read,
    "message:delete": messages.delete,
    "message:history": messages.history,
    "typing:start": typing_indicator.start,
    "typing:stop": typing_indicator.stop,
    "conversation:join": conversations.join,
    "conversation:leave": conversations.leave,
    "conversation:create": conversations.create,
    "conversation:list": conversations.list_,
    "user:status": users.status,
    "auth:refresh": users.refresh,
}
