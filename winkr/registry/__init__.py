"""The presence registry seam: which connections a user has open on which node, whether their
contacts were told they are online, their status, and the pending offline checks (contract §7,
§16). ``InProcessRegistry`` (``winkr.registry.memory``) is one node's counting of old and the
registry several nodes of one trio run share; ``RedisRegistry`` (``winkr.registry.redis``,
imported only in cluster mode) keeps the same state in Redis, decided by Lua scripts."""
from winkr.registry.base import Expiry, PresenceRegistry, RegistryUnavailable, StatusChange
from winkr.registry.memory import InProcessRegistry

__all__ = ["Expiry", "InProcessRegistry", "PresenceRegistry", "RegistryUnavailable", "StatusChange"]
