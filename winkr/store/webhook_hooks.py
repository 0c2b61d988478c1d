"""Where a change that fires a webhook (contract §14) records its event — a STUB for now.

Every call site runs inside the store writer's transaction of the change itself (``work``
functions given to ``StoreHandle.call``), so that once the outbox exists an event is stored
atomically with its cause and no crash loses one. The webhook outbox
(``winkr/store/webhook_outbox.py``) is being built separately; connecting it is one change
here: make :func:`enqueue_webhook` insert into the outbox table.

Call sites (grep ``enqueue_webhook``): ``user.blocked`` and one ``conversation.closed`` per
conversation a block closed (``winkr/handlers/safety.py``), ``conversation.closed`` of an
unmatch or a server-API close, and ``message.reported``.
"""
from __future__ import annotations

from typing import Any

from winkr.store.store import Store


def enqueue_webhook(store: Store, type: str, data: dict[str, Any], happened_at: float) -> None:  # noqa: A002
    """Record webhook event ``type`` (``"user.blocked"``, ...) with its ``data`` (the JSON
    object of §14, timestamps already RFC 3339) that happened at ``happened_at`` (wall-clock
    seconds: the body's ``timestamp``, §17.7), in the caller's transaction. Does nothing yet."""
    del store, type, data, happened_at
