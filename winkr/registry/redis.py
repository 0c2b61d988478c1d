"""The presence registry of a cluster: the same state as ``InProcessRegistry``, in Redis,
every decision one Lua script (atomic for all nodes). Imported only in cluster mode.

Keys (``P`` is the deployment's ``redis_key_prefix``; per-user keys share the hash tag
``{u:ID}``):

| key | type | meaning |
| --- | --- | --- |
| ``P nodes`` | sorted set | node id -> last heartbeat (ms, Redis ``TIME``); live within ``node_ttl`` |
| ``P {u:ID}:conns`` | hash | ``node|member`` -> ``a`` (admitted) or ``o`` (open): one per connection |
| ``P {u:ID}:visible`` | string | set while the contacts were told ``user:online`` |
| ``P {u:ID}:status`` | string | the chosen status unless ``online`` |
| ``P {n:NODE}:users`` | set | users with a member on that node (the dead-node sweep) |
| ``P grace`` | sorted set | user -> deadline (ms) of a pending offline check |

Every per-user script first prunes the members of dead nodes (reading ``nodes``). Scripts
name every key they touch, but ``nodes`` and ``grace`` are global keys: on Redis Cluster they
would be in another slot than the user's (docs/architecture.md says what that would take).
redis-py is synchronous: calls run on worker threads (a ``CapacityLimiter``).
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import redis
import trio

from winkr.registry.base import NODE_TTL_SECONDS, Expiry, RegistryUnavailable, StatusChange
from winkr.store.writer import RunSync

CALL_TIMEOUT_SECONDS = 2.0
THREADS = 8

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Prune members of dead nodes; returns (live members, open ones).
local function prune(conns, nodes, ttl, now)
  local all = redis.call('HGETALL', conns)
  local live, open = 0, 0
  for i = 1, #all, 2 do
    local node = string.match(all[i], '^(.*)|')
    local beat = redis.call('ZSCORE', nodes, node)
    if (not beat) or (now - tonumber(beat) > ttl) then
      redis.call('HDEL', conns, all[i])
    else
      live = live + 1
      if all[i + 1] == 'o' then open = open + 1 end
    end
  end
  return live, open
end
"""

# KEYS: conns, nodes, node_users. ARGV: member (node|m), limit, ttl ms, user.
_ADMIT = _COMMON + """
local now = now_ms()
local live = prune(KEYS[1], KEYS[2], tonumber(ARGV[3]), now)
local limit = tonumber(ARGV[2])
if limit > 0 and live >= limit then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'a')
redis.call('SADD', KEYS[3], ARGV[4])
return 1
"""

# KEYS: conns, nodes, visible, status, grace. ARGV: member, ttl ms, online_status (1/0), user.
_OPENED = _COMMON + """
local now = now_ms()
redis.call('HSET', KEYS[1], ARGV[1], 'o')
local live, open = prune(KEYS[1], KEYS[2], tonumber(ARGV[2]), now)
redis.call('ZREM', KEYS[5], ARGV[4])
if open == 1 and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[4])
  if ARGV[3] == '1' then
    redis.call('SET', KEYS[3], '1')
    return 1
  end
end
return 0
"""

# KEYS: conns, nodes, grace, node_users, visible. ARGV: member, ttl ms, user, grace ms, node.
_CLOSED = _COMMON + """
local now = now_ms()
local known = redis.call('HDEL', KEYS[1], ARGV[1])
local live, open = prune(KEYS[1], KEYS[2], tonumber(ARGV[2]), now)
if known == 0 then
  -- Redis lost the member (restarted empty, or took our node for dead): the contacts may
  -- have seen the user online, so with nothing open an offline check is due as usual.
  if open > 0 or redis.call('ZSCORE', KEYS[3], ARGV[3]) then return 0 end
  redis.call('SET', KEYS[5], '1')
end
local mine = false
for _, member in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(member, 1, #ARGV[5] + 1) == ARGV[5] .. '|' then mine = true end
end
if not mine then redis.call('SREM', KEYS[4], ARGV[3]) end
if open > 0 then return 0 end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
return 1
"""

# KEYS: conns, nodes, grace, visible, status. ARGV: user, ttl ms.
# Returns {state, a, b}: state 0 = nothing, 1 = expired (a: announce, b: touch), 2 = not due (a: ms left).
_GRACE_EXPIRED = _COMMON + """
local now = now_ms()
local deadline = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not deadline then return {0, 0, 0} end
if tonumber(deadline) > now then return {2, tonumber(deadline) - now, 0} end
redis.call('ZREM', KEYS[3], ARGV[1])
local live, open = prune(KEYS[1], KEYS[2], tonumber(ARGV[2]), now)
if open > 0 then return {0, 0, 0} end
local announce = redis.call('DEL', KEYS[4])
local status = redis.call('GET', KEYS[5])
redis.call('DEL', KEYS[5])
local touch = 1
if status == 'offline' then touch = 0 end
return {1, announce, touch}
"""

# KEYS: conns, nodes, visible, status. ARGV: status, online_status, ttl ms.
_SET_STATUS = _COMMON + """
local now = now_ms()
local previous = redis.call('GET', KEYS[4]) or 'online'
if ARGV[1] == 'online' then redis.call('DEL', KEYS[4]) else redis.call('SET', KEYS[4], ARGV[1]) end
if ARGV[1] == 'offline' then
  if redis.call('DEL', KEYS[3]) == 1 then return {previous, 'offline'} end
  return {previous, ''}
end
local live, open = prune(KEYS[1], KEYS[2], tonumber(ARGV[3]), now)
if ARGV[2] == '1' and open > 0 and redis.call('SET', KEYS[3], '1', 'NX') then return {previous, 'online'} end
return {previous, ''}
"""

# KEYS: conns, nodes, visible, status. ARGV: online_status, ttl ms.
_SET_ONLINE_STATUS = _COMMON + """
local now = now_ms()
if ARGV[1] == '0' then
  if redis.call('DEL', KEYS[3]) == 1 then return 'offline' end
  return ''
end
local live, open = prune(KEYS[1], KEYS[2], tonumber(ARGV[2]), now)
if open > 0 and redis.call('GET', KEYS[4]) ~= 'offline' and redis.call('SET', KEYS[3], '1', 'NX') then
  return 'online'
end
return ''
"""

# KEYS: conns, nodes, status. ARGV: ttl ms. Returns {open, status}.
_TRUTH = _COMMON + """
local live, open = prune(KEYS[1], KEYS[2], tonumber(ARGV[1]), now_ms())
if open == 0 then return {0, 'offline'} end
return {open, redis.call('GET', KEYS[3]) or 'online'}
"""

# KEYS: grace. Users whose offline check is due (Redis TIME decides, one clock for all nodes).
_DUE = _COMMON + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, 1000)
"""

# KEYS: conns, node_users. ARGV: member, user, node. An admission whose connection never opened.
_RELEASE = """
redis.call('HDEL', KEYS[1], ARGV[1])
for _, member in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(member, 1, #ARGV[3] + 1) == ARGV[3] .. '|' then return 1 end
end
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: nodes, then one conns key per user. ARGV: ttl ms. The open connections of each user.
_OPEN_COUNTS = _COMMON + """
local now = now_ms()
local counts = {}
for i = 2, #KEYS do
  local live, open = prune(KEYS[i], KEYS[1], tonumber(ARGV[1]), now)
  counts[i - 1] = open
end
return counts
"""

# KEYS: nodes. ARGV: node, ttl ms. 1 if the node was known and live, else 0.
_HEARTBEAT = _COMMON + """
local now = now_ms()
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
if beat and now - tonumber(beat) <= tonumber(ARGV[2]) then return 1 end
return 0
"""

# KEYS: nodes, grace. ARGV: ttl ms, grace ms, prefix. Users whose last open connection was on a
# dead node get an offline check; the dead nodes are forgotten.
_SWEEP = _COMMON + """
local now = now_ms()
local ttl = tonumber(ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl - 1)
local left = {}
for _, node in ipairs(dead) do
  local users_key = ARGV[3] .. '{n:' .. node .. '}:users'
  for _, user in ipairs(redis.call('SMEMBERS', users_key)) do
    local conns = ARGV[3] .. '{u:' .. user .. '}:conns'
    local before = redis.call('HLEN', conns)
    local live, open = prune(conns, KEYS[1], ttl, now)
    if open == 0 and before > live and not redis.call('ZSCORE', KEYS[2], user) then
      redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), user)
      table.insert(left, user)
    end
  end
  redis.call('DEL', users_key)
  redis.call('ZREM', KEYS[1], node)
end
return left
"""


class RedisRegistry:
    """One node's ``PresenceRegistry`` in Redis. ``run_sync`` runs the blocking calls (worker
    threads by default; tests may pass an inline one)."""

    def __init__(self, client: redis.Redis, node_id: str, *, prefix: str = "winkr:",
                 node_ttl: float = NODE_TTL_SECONDS, run_sync: RunSync | None = None) -> None:
        self._client = client
        self.node_id = node_id
        self._prefix = prefix
        self._ttl_ms = int(node_ttl * 1000)
        self._threads = trio.CapacityLimiter(THREADS)
        self._run_sync: RunSync = run_sync or partial(trio.to_thread.run_sync, limiter=self._threads)
        scripts = {"admit": _ADMIT, "opened": _OPENED, "closed": _CLOSED, "grace": _GRACE_EXPIRED,
                   "status": _SET_STATUS, "online_status": _SET_ONLINE_STATUS, "truth": _TRUTH,
                   "heartbeat": _HEARTBEAT, "sweep": _SWEEP, "due": _DUE, "release": _RELEASE,
                   "open_counts": _OPEN_COUNTS}
        self._scripts = {name: client.register_script(body) for name, body in scripts.items()}

    @classmethod
    def from_url(cls, url: str, node_id: str, **kwargs: Any) -> RedisRegistry:
        client = redis.Redis.from_url(url, socket_timeout=CALL_TIMEOUT_SECONDS,
                                      socket_connect_timeout=CALL_TIMEOUT_SECONDS)
        return cls(client, node_id, **kwargs)

    @property
    def shared(self) -> bool:
        return True

    def _user(self, user_id: str, what: str) -> str:
        return f"{self._prefix}{{u:{user_id}}}:{what}"

    @property
    def _nodes(self) -> str:
        return f"{self._prefix}nodes"

    @property
    def _grace(self) -> str:
        return f"{self._prefix}grace"

    def _member(self, member: str) -> str:
        return f"{self.node_id}|{member}"

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._run_sync(partial(self._scripts[script], keys=keys, args=args))
        except (redis.RedisError, OSError) as exc:
            raise RegistryUnavailable(f"the presence registry cannot be reached ({type(exc).__name__})") from exc

    async def admit(self, user_id: str, member: str, limit: int) -> bool:
        node_users = f"{self._prefix}{{n:{self.node_id}}}:users"
        return bool(await self._call("admit", [self._user(user_id, "conns"), self._nodes, node_users],
                                     [self._member(member), limit, self._ttl_ms, user_id]))

    async def release(self, user_id: str, member: str) -> None:
        node_users = f"{self._prefix}{{n:{self.node_id}}}:users"
        await self._call("release", [self._user(user_id, "conns"), node_users],
                         [self._member(member), user_id, self.node_id])

    async def opened(self, user_id: str, member: str, online_status: bool) -> bool:
        return bool(await self._call("opened", [self._user(user_id, "conns"), self._nodes,
                                                self._user(user_id, "visible"), self._user(user_id, "status"),
                                                self._grace],
                                     [self._member(member), self._ttl_ms, int(online_status), user_id]))

    async def closed(self, user_id: str, member: str, grace: float) -> bool:
        node_users = f"{self._prefix}{{n:{self.node_id}}}:users"
        left = await self._call("closed", [self._user(user_id, "conns"), self._nodes, self._grace, node_users,
                                           self._user(user_id, "visible")],
                                [self._member(member), self._ttl_ms, user_id, int(grace * 1000), self.node_id])
        return bool(left)

    async def grace_expired(self, user_id: str) -> Expiry:
        state, a, b = await self._call("grace", [self._user(user_id, "conns"), self._nodes, self._grace,
                                                 self._user(user_id, "visible"), self._user(user_id, "status")],
                                       [user_id, self._ttl_ms])
        if state == 2:
            return Expiry(retry_in=int(a) / 1000)
        if state == 1:
            return Expiry(bool(a), bool(b))
        return Expiry()

    async def set_status(self, user_id: str, status: str, online_status: bool) -> StatusChange:
        previous, announce = await self._call("status", [self._user(user_id, "conns"), self._nodes,
                                                          self._user(user_id, "visible"),
                                                          self._user(user_id, "status")],
                                              [status, int(online_status), self._ttl_ms])
        return StatusChange(_text(previous), _text(announce) or None)

    async def set_online_status(self, user_id: str, online_status: bool) -> str | None:
        announce = await self._call("online_status", [self._user(user_id, "conns"), self._nodes,
                                                      self._user(user_id, "visible"), self._user(user_id, "status")],
                                    [int(online_status), self._ttl_ms])
        return _text(announce) or None

    async def visible(self, user_ids: Iterable[str]) -> dict[str, bool]:
        users = list(user_ids)
        if not users:
            return {}
        try:
            values = await self._run_sync(partial(self._client.mget, [self._user(u, "visible") for u in users]))
        except (redis.RedisError, OSError) as exc:
            raise RegistryUnavailable("the presence registry cannot be reached") from exc
        return {user: value is not None for user, value in zip(users, values)}

    async def connected(self, user_ids: Iterable[str]) -> frozenset[str]:
        users = list(user_ids)
        if not users:
            return frozenset()
        counts = await self._call("open_counts", [self._nodes, *(self._user(u, "conns") for u in users)],
                                  [self._ttl_ms])
        return frozenset(user for user, count in zip(users, counts) if int(count))

    async def truth(self, user_id: str) -> tuple[int, str]:
        connections, status = await self._call("truth", [self._user(user_id, "conns"), self._nodes,
                                                         self._user(user_id, "status")], [self._ttl_ms])
        return int(connections), _text(status)

    async def heartbeat(self) -> bool:
        return bool(await self._call("heartbeat", [self._nodes], [self.node_id, self._ttl_ms]))

    async def sweep(self, grace: float) -> list[str]:
        left = await self._call("sweep", [self._nodes, self._grace], [self._ttl_ms, int(grace * 1000), self._prefix])
        return [_text(user) for user in left]

    async def due(self) -> list[str]:
        return [_text(user) for user in await self._call("due", [self._grace], [])]

    async def leave(self) -> None:
        try:
            await self._run_sync(partial(self._client.zadd, self._nodes, {self.node_id: 0}))
        except (redis.RedisError, OSError) as exc:
            raise RegistryUnavailable("the presence registry cannot be reached") from exc

    async def aclose(self) -> None:
        await self._run_sync(self._client.close)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
