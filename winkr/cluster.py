"""Cluster mode: what one node needs to know about the others' shared engines.

A node is part of a cluster when it is given a broker URL (``broker_url = "redis://..."``):
its broker, presence registry and limiter then live in that Redis, shared by every node.
"""
from __future__ import annotations

from winkr.config import Settings


def cluster_redis_url(settings: Settings) -> str | None:
    """The Redis URL the nodes share (``broker_url``), or None on a single node."""
    return settings.broker_url if settings.clustered else None
