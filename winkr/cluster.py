"""Cluster mode: what one node needs to know about the others' shared engines.

A node is part of a cluster when it is given a broker URL (``redis://...``): its broker,
presence registry and limiter then live in that Redis, shared by every node.
"""
from __future__ import annotations

from winkr.config import Settings


def cluster_redis_url(settings: Settings) -> str | None:
    """The Redis URL the nodes share (the broker setting), or None on a single node."""
    # The broker setting arrives with the Broker seam (issue 14); until then no node is in a cluster.
    url = getattr(settings, "broker_url", None) or getattr(settings, "broker", None)
    if isinstance(url, str) and url.startswith(("redis://", "rediss://", "unix://")):
        return url
    return None
