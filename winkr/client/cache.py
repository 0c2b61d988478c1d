"""The client's local message cache: a small interface an app can replace, and the default
in-memory implementation (the newest messages of the most recently used conversations)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

Message = dict[str, Any]


class MessageCache(Protocol):
    """Where the client keeps recent messages. Implementations must be quick: the client awaits
    them while reading frames (run slow storage with ``trio.to_thread.run_sync``)."""

    async def put(self, conversation_id: str, messages: Sequence[Message]) -> None:
        """Insert or replace by ``seq``."""

    async def get(self, conversation_id: str, *, before_seq: int | None = None,
                  after_seq: int | None = None, limit: int = 50) -> list[Message]:
        """Like ``message:history``: the newest ``limit`` in the range (the oldest above
        ``after_seq`` when it is the only cursor), in ascending ``seq``."""
        ...

    async def last_seq(self, conversation_id: str) -> int | None:
        """The highest ``seq`` held, or None."""
        ...

    async def update(self, conversation_id: str, message_id: str, patch: dict[str, Any]) -> None:
        """Change fields of one held message (a deletion makes a tombstone)."""

    async def clear(self, conversation_id: str | None = None) -> None:
        """Forget one conversation, or everything."""


class MemoryCache:
    """The newest ``max_messages`` messages of each of the ``max_conversations`` most recently
    used conversations."""

    def __init__(self, *, max_messages: int = 200, max_conversations: int = 100) -> None:
        self.max_messages = max_messages
        self.max_conversations = max_conversations
        self._conversations: OrderedDict[str, dict[int, Message]] = OrderedDict()

    def _bucket(self, conversation_id: str) -> dict[int, Message]:
        bucket = self._conversations.pop(conversation_id, None) or {}
        self._conversations[conversation_id] = bucket
        while len(self._conversations) > self.max_conversations:
            self._conversations.popitem(last=False)
        return bucket

    async def put(self, conversation_id: str, messages: Sequence[Message]) -> None:
        if not messages:
            return
        bucket = self._bucket(conversation_id)
        for message in messages:
            bucket[message["seq"]] = dict(message)
        if len(bucket) > self.max_messages:
            keep = sorted(bucket)[-self.max_messages:]
            self._conversations[conversation_id] = {seq: bucket[seq] for seq in keep}

    async def get(self, conversation_id: str, *, before_seq: int | None = None,
                  after_seq: int | None = None, limit: int = 50) -> list[Message]:
        bucket = self._conversations.get(conversation_id, {})
        seqs = sorted(s for s in bucket if (before_seq is None or s < before_seq)
                      and (after_seq is None or s > after_seq))
        seqs = seqs[:limit] if after_seq is not None and before_seq is None else seqs[-limit:]
        return [dict(bucket[s]) for s in seqs]

    async def last_seq(self, conversation_id: str) -> int | None:
        bucket = self._conversations.get(conversation_id)
        return max(bucket) if bucket else None

    async def update(self, conversation_id: str, message_id: str, patch: dict[str, Any]) -> None:
        for seq, message in self._conversations.get(conversation_id, {}).items():
            if message.get("id") == message_id:
                self._conversations[conversation_id][seq] = {**message, **patch}

    async def clear(self, conversation_id: str | None = None) -> None:
        if conversation_id is None:
            self._conversations.clear()
        else:
            self._conversations.pop(conversation_id, None)
