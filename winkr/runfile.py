"""The run file: how tools find the server that owns a database while it runs.

``winkr serve`` writes ``<db>.run.json`` (``{"pid", "url"}``; beside the SQLite file, or
``db`` with PostgreSQL) once it listens and removes it on exit, so ``winkr conversation
create`` goes through the running server's actors (over its WebSocket, as a service account)
instead of writing the database behind its back. A run file left by a killed server is
recognised by its dead ``pid``.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import orjson

from winkr.config import Settings


def run_file(settings: Settings) -> Path:
    return Path(settings.db_path).with_suffix(Path(settings.db_path).suffix + ".run.json")


def local_url(host: str, port: int) -> str:
    """The WebSocket URL a process on this machine uses to reach a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"ws://[{host}]:{port}/ws" if ":" in host else f"ws://{host}:{port}/ws"


def write_run_file(settings: Settings, port: int) -> None:
    """Record this process as the database's server (best effort: a read-only folder only
    means tools cannot find it)."""
    with contextlib.suppress(OSError):
        run_file(settings).write_bytes(orjson.dumps({"pid": os.getpid(), "url": local_url(settings.host, port)}))


def remove_run_file(settings: Settings) -> None:
    path = run_file(settings)
    with contextlib.suppress(OSError, ValueError):
        if orjson.loads(path.read_bytes()).get("pid") == os.getpid():
            path.unlink()


def running_server_url(settings: Settings) -> str | None:
    """The URL of the live server of this database, or ``None`` when none runs."""
    try:
        record = orjson.loads(run_file(settings).read_bytes())
        pid, url = int(record["pid"]), str(record["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # left behind by a server that was killed
    except PermissionError:
        pass  # alive, another user's
    return url
