"""Cluster mode: what one node needs to know about the others and their shared engines.

A node is in cluster mode when it is given a broker URL (``broker_url = "redis://..."``): its
broker, presence registry and limiter then live in that Redis, shared by every node given it
and the same PostgreSQL ``database_url``. A PostgreSQL database without a broker is one node
(contract §17.11): nothing it holds in memory (presence, rooms, limits) is shared, so a second
node on the same database would break presence and limits, not the record.

Cluster mode needs what one node could do without:

- an explicit JWT secret (HS256) or public key (RS256/ES256): one node generates a secret beside
  its database when none is configured, and each node of a cluster would then make its own;
- a PostgreSQL ``database_url``: nodes on SQLite files of their own would each keep a separate
  record behind one shared presence and fan-out;
- the ``cluster`` extra (redis-py, and psycopg for PostgreSQL).

``BrokerHealth`` is the broker's state as this node sees it: the broker writes it, ``/readyz``
(both ports) and the metrics read it.
"""
from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from winkr.config import SECRET_HINT, Settings

if TYPE_CHECKING:  # the CLI imports this module for its checks: no prometheus_client then
    from winkr.metrics import Metrics

from winkr.store.engine import CLUSTER_EXTRA


def cluster_redis_url(settings: Settings) -> str | None:
    """The Redis URL the nodes share (``broker_url``), or None on a single node."""
    return settings.broker_url if settings.clustered else None


def node_name(settings: Settings) -> str:
    """This node's id: ``node_id``, or hostname-pid (unique among running nodes)."""
    return settings.node_id or f"{socket.gethostname()}-{os.getpid()}"


def cluster_problems(settings: Settings) -> list[str]:
    """Why this node cannot join a cluster (one line each, saying what to set or install);
    empty on a single node. Checked by ``winkr serve`` (exit 2) and ``winkr check-config``."""
    if not settings.clustered:
        return []
    problems = []
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        problems.append(f"broker_url names a Redis, and the Redis client ({exc.name}) is not installed: "
                        f"{CLUSTER_EXTRA}")
    if settings.database.engine == "sqlite":
        # Each node would keep its own record: conversations made on one node are NOT_FOUND on
        # the others, while presence and fan-out say they are one service.
        problems.append("broker_url is set (more than one node) but the database is the SQLite file "
                        f"{settings.database.path}: every node must share one PostgreSQL database; set "
                        "database_url (or WINKR_DATABASE_URL) to the same postgresql://… URL on every node")
    if settings.jwt_algorithm == "HS256" and not settings.jwt_secret:
        problems.append("broker_url is set (more than one node) but jwt_secret is not: every node must verify "
                        "the same tokens, and a node without a secret would generate one of its own; set "
                        "jwt_secret (or WINKR_JWT_SECRET) to the same value on every node; make one with "
                        f"{SECRET_HINT}")
    return problems


class BrokerHealth:
    """Whether this node's broker reaches its Redis, and what it had to do about it. Written by
    the broker (on the trio thread), read by readiness and the scrape (``winkr_broker_*``)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._problem: str | None = None
        metrics.broker_up.set(1)

    @property
    def problem(self) -> str | None:
        """None while the broker works; else why not (for ``/readyz``, no secrets in it)."""
        return self._problem

    def up(self) -> None:
        """The broker reaches Redis again (or did from the start)."""
        self._problem = None
        self._metrics.broker_up.set(1)

    def down(self, why: str = "the broker cannot reach Redis") -> None:
        """The broker lost Redis: not ready until ``up``."""
        self._problem = why
        self._metrics.broker_up.set(0)

    def publish_failed(self, events: int = 1) -> None:
        """``events`` were committed but could not be published (peers catch up from the database)."""
        self._metrics.broker_publish_failures.inc(events)

    def resynced(self, rooms: int = 1) -> None:
        """``rooms`` were read again from the database after a gap, a reconnect or an overflow."""
        self._metrics.broker_resyncs.inc(rooms)
