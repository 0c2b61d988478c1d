"""The in-process presence registry: a node alone (today's counting, behind the seam), or the
state several nodes of one trio run share (``tests/cluster_support.py``). Time is trio's, so
MockClock drives heartbeats, node deaths and grace periods.

Each method runs to completion without a checkpoint in between its reads and writes: atomic
for every node of the trio run, as a Lua script is for Redis.
"""
from __future__ import annotations

from collections.abc import Iterable

import attrs
import trio

from winkr.registry.base import NODE_TTL_SECONDS, OFFLINE, ONLINE, Expiry, StatusChange


@attrs.define
class _UserState:
    members: dict[tuple[str, str], bool] = attrs.Factory(dict)  # (node, member) -> open
    visible: bool = False
    status: str | None = None  # None: online (the default)


class InProcessRegistry:
    """The shared state. ``shared=False``: one node, which never dies (no heartbeats)."""

    def __init__(self, *, shared: bool = True, node_ttl: float = NODE_TTL_SECONDS) -> None:
        self.shared = shared
        self.node_ttl = node_ttl
        self.users: dict[str, _UserState] = {}
        self.grace: dict[str, float] = {}  # user -> deadline (trio time)
        self.nodes: dict[str, float] = {}  # node -> last heartbeat (trio time)

    def attach(self, node_id: str) -> InProcessRegistryNode:
        self.nodes[node_id] = trio.current_time()
        return InProcessRegistryNode(self, node_id)

    def _live(self, node_id: str, now: float) -> bool:
        if not self.shared:
            return True
        beat = self.nodes.get(node_id)
        return beat is not None and now - beat <= self.node_ttl

    def _state(self, user_id: str) -> tuple[_UserState, int, int]:
        """The user's state with dead nodes' members pruned: (state, live members, open ones)."""
        state = self.users.setdefault(user_id, _UserState())
        now = trio.current_time()
        for key in [key for key in state.members if not self._live(key[0], now)]:
            del state.members[key]
        return state, len(state.members), sum(state.members.values())

    def _forget_if_idle(self, user_id: str, state: _UserState) -> None:
        if not state.members and not state.visible and state.status is None and user_id not in self.grace:
            del self.users[user_id]


class InProcessRegistryNode:
    """One node's ``PresenceRegistry`` on an ``InProcessRegistry``."""

    def __init__(self, registry: InProcessRegistry, node_id: str) -> None:
        self._r = registry
        self.node_id = node_id

    @property
    def shared(self) -> bool:
        return self._r.shared

    async def admit(self, user_id: str, member: str, limit: int) -> bool:
        state, live, _ = self._r._state(user_id)
        if limit and live >= limit:
            self._r._forget_if_idle(user_id, state)
            return False
        state.members[(self.node_id, member)] = False
        return True

    async def release(self, user_id: str, member: str) -> None:
        state, _, _ = self._r._state(user_id)
        state.members.pop((self.node_id, member), None)
        self._r._forget_if_idle(user_id, state)

    async def opened(self, user_id: str, member: str, online_status: bool) -> bool:
        state, _, _ = self._r._state(user_id)
        state.members[(self.node_id, member)] = True
        _, _, open_now = self._r._state(user_id)
        self._r.grace.pop(user_id, None)
        if open_now == 1 and not state.visible:
            state.status = None  # appearing offline lasts for a session (contract §7)
            if online_status:
                state.visible = True
                return True
        return False

    async def closed(self, user_id: str, member: str, grace: float) -> bool:
        state, _, _ = self._r._state(user_id)
        known = state.members.pop((self.node_id, member), None) is not None
        _, _, open_now = self._r._state(user_id)
        if open_now:
            return False
        if not known:  # the registry lost it (as Redis does when restarted empty): check as usual
            if user_id in self._r.grace:
                return False
            state.visible = True
        self._r.grace[user_id] = trio.current_time() + grace
        return True

    async def grace_expired(self, user_id: str) -> Expiry:
        deadline = self._r.grace.get(user_id)
        if deadline is None:
            return Expiry()
        now = trio.current_time()
        if deadline > now:
            return Expiry(retry_in=deadline - now)
        del self._r.grace[user_id]
        state, _, open_now = self._r._state(user_id)
        if open_now:
            return Expiry()
        announce, touch = state.visible, state.status != OFFLINE
        state.visible = False
        state.status = None
        self._r._forget_if_idle(user_id, state)
        return Expiry(announce, touch)

    async def set_status(self, user_id: str, status: str, online_status: bool) -> StatusChange:
        state, _, open_now = self._r._state(user_id)
        previous = state.status or ONLINE
        state.status = None if status == ONLINE else status
        announce = None
        if status == OFFLINE:
            if state.visible:
                state.visible, announce = False, OFFLINE
        elif not state.visible and online_status and open_now:
            state.visible, announce = True, ONLINE
        return StatusChange(previous, announce)

    async def set_online_status(self, user_id: str, online_status: bool) -> str | None:
        state, _, open_now = self._r._state(user_id)
        announce = None
        if not online_status and state.visible:
            state.visible, announce = False, OFFLINE
        elif online_status and not state.visible and open_now and state.status != OFFLINE:
            state.visible, announce = True, ONLINE
        self._r._forget_if_idle(user_id, state)
        return announce

    async def visible(self, user_ids: Iterable[str]) -> dict[str, bool]:
        users = self._r.users
        return {user: (known := users.get(user)) is not None and known.visible for user in user_ids}

    async def connected(self, user_ids: Iterable[str]) -> frozenset[str]:
        return frozenset(user for user in user_ids if user in self._r.users and self._r._state(user)[2])

    async def truth(self, user_id: str) -> tuple[int, str]:
        if user_id not in self._r.users:
            return 0, OFFLINE
        state, _, open_now = self._r._state(user_id)
        return open_now, (state.status or ONLINE) if open_now else OFFLINE

    async def heartbeat(self) -> bool:
        known = self.node_id in self._r.nodes and self._r._live(self.node_id, trio.current_time())
        self._r.nodes[self.node_id] = trio.current_time()
        return known

    async def sweep(self, grace: float) -> list[str]:
        now = trio.current_time()
        dead = {node for node in self._r.nodes if not self._r._live(node, now)}
        if not dead:
            return []
        left = []
        for user_id, state in list(self._r.users.items()):
            if any(node in dead for node, _ in state.members):
                _, _, open_now = self._r._state(user_id)
                if not open_now and user_id not in self._r.grace:
                    self._r.grace[user_id] = now + grace
                    left.append(user_id)
        for node in dead:
            del self._r.nodes[node]
        return left

    async def due(self) -> list[str]:
        now = trio.current_time()
        return [user for user, deadline in self._r.grace.items() if deadline <= now]

    async def leave(self) -> None:
        self._r.nodes[self.node_id] = -float("inf")
