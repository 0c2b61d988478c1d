"""The hub actor: the registry of awake rooms. It wakes a room on first use, in its own
nursery, and retires it when the room reports itself idle."""
from __future__ import annotations

from collections.abc import Callable

import attrs
import trio
from prometheus_client import Gauge

from winkr.actor import Mailbox, Reply
from winkr.room import RoomHandle, RoomMessage, RoomServices, run_room


@attrs.frozen
class _GetRoom:
    conversation_id: str
    reply: Reply[RoomHandle]


@attrs.frozen
class _Retire:
    conversation_id: str
    handle: RoomHandle


@attrs.frozen
class _Awake:
    conversation_id: str | None  # None: every awake room
    reply: Reply[list[RoomHandle]]


HubRequest = _GetRoom | _Retire | _Awake


class HubHandle:
    def __init__(self, inbox: trio.MemorySendChannel[HubRequest]) -> None:
        self._inbox = inbox

    async def room(self, conversation_id: str) -> RoomHandle:
        """The awake room of a conversation (woken if needed). A room for an unknown id
        answers every request with ``NOT_FOUND`` and sleeps again soon."""
        reply: Reply[RoomHandle] = Reply()
        await self._inbox.send(_GetRoom(conversation_id, reply))
        return await reply.wait()

    async def awake(self, conversation_id: str | None) -> list[RoomHandle]:
        """The conversation's room if it is awake (never wakes one), or with ``None`` every
        awake room: where events from other nodes go."""
        reply: Reply[list[RoomHandle]] = Reply()
        await self._inbox.send(_Awake(conversation_id, reply))
        return await reply.wait()

    async def retire(self, conversation_id: str, handle: RoomHandle) -> None:
        """A room that went idle asks to sleep; later requests wake a new one."""
        await self._inbox.send(_Retire(conversation_id, handle))


async def run_hub(make_services: Callable[[HubHandle], RoomServices], *, rooms_gauge: Gauge | None = None,
                  room_inbox_size: int = 1024, inbox_size: int = 4096,
                  task_status: trio.TaskStatus[HubHandle] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the registry until cancelled; rooms run in the hub's nursery."""
    send, receive = trio.open_memory_channel[HubRequest](inbox_size)
    hub = HubHandle(send)
    services = make_services(hub)
    rooms: dict[str, RoomHandle] = {}
    async with trio.open_nursery() as nursery:
        task_status.started(hub)
        async with receive:
            async for request in receive:
                match request:
                    case _GetRoom(conversation_id=conversation_id, reply=reply):
                        handle = rooms.get(conversation_id)
                        if handle is None:
                            mailbox = Mailbox[RoomMessage](room_inbox_size)
                            handle = rooms[conversation_id] = RoomHandle(conversation_id, mailbox)
                            nursery.start_soon(run_room, conversation_id, services, handle, mailbox)
                            if rooms_gauge is not None:
                                rooms_gauge.inc()
                        reply.set(handle)
                    case _Awake(conversation_id=None, reply=reply):
                        reply.set(list(rooms.values()))
                    case _Awake(conversation_id=str(conversation_id), reply=reply):
                        reply.set([handle] if (handle := rooms.get(conversation_id)) is not None else [])
                    case _Retire(conversation_id=conversation_id, handle=handle):
                        if rooms.get(conversation_id) is handle:
                            del rooms[conversation_id]
                            handle.close()
                            if rooms_gauge is not None:
                                rooms_gauge.dec()
        nursery.cancel_scope.cancel()
