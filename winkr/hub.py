"""The hub actor: the registry of awake rooms. It wakes a room on first use, in its own
nursery, and retires it when the room reports itself idle."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import trio

from winkr.actor import Reply
from winkr.room import RoomHandle, RoomServices, run_room


@attrs.frozen
class _GetRoom:
    conversation_id: str
    reply: Reply[RoomHandle]


@attrs.frozen
class _Retire:
    conversation_id: str
    handle: RoomHandle


class HubHandle:
    def __init__(self, inbox: trio.MemorySendChannel[Any]) -> None:
        self._inbox = inbox

    async def room(self, conversation_id: str) -> RoomHandle:
        """The awake room of a conversation (woken if needed). A room for an unknown id
        answers every request with ``NOT_FOUND``."""
        reply: Reply[RoomHandle] = Reply()
        await self._inbox.send(_GetRoom(conversation_id, reply))
        return await reply.wait()

    async def retire(self, conversation_id: str, handle: RoomHandle) -> None:
        await self._inbox.send(_Retire(conversation_id, handle))


async def run_hub(make_services: Callable[[HubHandle], RoomServices], *, rooms_gauge: Any = None,
                  room_inbox_size: int = 1024,
                  inbox_size: int = 4096,
                  task_status: trio.TaskStatus[HubHandle] = trio.TASK_STATUS_IGNORED) -> None:
    send, receive = trio.open_memory_channel[Any](inbox_size)
    hub = HubHandle(send)
    services = make_services(hub)
    rooms: dict[str, RoomHandle] = {}
    async with trio.open_nursery() as nursery:
        task_status.started(hub)
        async with receive:
            async for request in receive:
                if isinstance(request, _GetRoom):
                    handle = rooms.get(request.conversation_id)
                    if handle is None:
                        room_send, room_receive = trio.open_memory_channel[Any](room_inbox_size)
                        handle = rooms[request.conversation_id] = RoomHandle(request.conversation_id, room_send)
                        nursery.start_soon(run_room, request.conversation_id, services, handle, room_receive)
                        if rooms_gauge is not None:
                            rooms_gauge.inc()
                    request.reply.set(handle)
                elif isinstance(request, _Retire):
                    if rooms.get(request.conversation_id) is request.handle:
                        del rooms[request.conversation_id]
                        request.handle.close()
                        if rooms_gauge is not None:
                            rooms_gauge.dec()
        nursery.cancel_scope.cancel()
