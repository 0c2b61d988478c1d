"""The interface of a presence registry and its answers.

One *member* per connection (an admission becomes a member at once, so the connection cap
counts handshakes in progress), tagged with the node that holds it. Nodes heartbeat; the
members of a node that stopped (``node_ttl`` without a heartbeat) no longer count anywhere and
are pruned. Every decision that must be made once for the whole cluster — "tell the contacts
this user is online", "…is offline now" — is one atomic step on the shared state (a *visible*
flag set if absent, deleted by exactly one caller), so exactly one node announces it.

Times: ``grace`` arguments are seconds; the registry keeps deadlines on its own clock (trio's
for the in-process one, Redis ``TIME`` for Redis).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import attrs

ONLINE = "online"
OFFLINE = "offline"
HEARTBEAT_SECONDS = 1.0  # how often a node says it is alive (and polls for due offline checks)
NODE_TTL_SECONDS = 3.0  # a node silent this long is dead: its members stop counting


class RegistryUnavailable(Exception):
    """The shared presence state cannot be reached (a cluster's Redis is down): new connections
    are refused with 503 meanwhile; established ones go on (contract §17.9)."""


@attrs.frozen
class Expiry:
    """The end of a user's grace period, as decided for the whole cluster."""

    announce_offline: bool = False  # this caller, alone, tells the contacts ``user:offline``
    touch_last_seen: bool = False  # and records ``last_seen_at`` (not for an invisible user)
    retry_in: float | None = None  # not due yet (clocks differ): ask again after this many seconds


@attrs.frozen
class StatusChange:
    previous: str  # the status before (``online`` when none was set)
    announce: str | None  # ``online``/``offline``: this caller tells the contacts; None: nothing to tell


class PresenceRegistry(Protocol):
    """One node's view of the shared presence state. Every method is one atomic step; errors
    (the backend unreachable) propagate as exceptions. Cancellation: a cancelled call may or may
    not have happened (the Redis one is a single script)."""

    node_id: str

    @property
    def shared(self) -> bool:
        """Whether other nodes use the same state (then nodes heartbeat and poll)."""

    async def admit(self, user_id: str, member: str, limit: int) -> bool:
        """Reserve a connection slot: refused when the user already has ``limit`` live members
        anywhere (0: no limit)."""

    async def release(self, user_id: str, member: str) -> None:
        """An admission whose connection never opened."""

    async def opened(self, user_id: str, member: str, online_status: bool) -> bool:
        """The member's connection is open. For the user's first open connection anywhere
        (while their contacts do not see them online) the status resets to online; ``True``
        when this caller must announce ``user:online`` (``online_status`` is their privacy
        setting)."""

    async def closed(self, user_id: str, member: str, grace: float) -> bool:
        """The connection closed. ``True`` when the user has no open connection left anywhere:
        an offline check is then due in ``grace`` seconds (kept in the registry, so any node
        can finish it)."""

    async def grace_expired(self, user_id: str) -> Expiry:
        """Finish the user's offline check, if due: once for the whole cluster."""

    async def set_status(self, user_id: str, status: str, online_status: bool) -> StatusChange:
        """The user chose ``status`` (``offline``: appear offline)."""

    async def set_online_status(self, user_id: str, online_status: bool) -> str | None:
        """The privacy setting changed: ``online``/``offline`` when this caller must announce."""

    async def visible(self, user_ids: Iterable[str]) -> dict[str, bool]:
        """Whether each user's contacts see them online."""

    async def connected(self, user_ids: Iterable[str]) -> frozenset[str]:
        """The users with at least one open connection on a live node."""

    async def truth(self, user_id: str) -> tuple[int, str]:
        """(open connections anywhere, status); status ``offline`` without a connection."""

    async def heartbeat(self) -> bool:
        """This node is alive. ``False`` when the registry did not know it (its first beat, or
        its state was lost: Redis restarted empty, or the node was taken for dead): its
        connections must then be registered again."""

    async def sweep(self, grace: float) -> list[str]:
        """Prune the members of dead nodes; the users left with no open connection get an
        offline check due in ``grace`` seconds. Returns them."""

    async def due(self) -> list[str]:
        """Users whose offline check is due (for ``grace_expired``)."""

    async def leave(self) -> None:
        """This node stops: its members stop counting now (the others finish its checks)."""
