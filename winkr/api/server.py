"""Serving the server API over HTTP/1.1 with hypercorn's trio worker, as a task of the running
server (so it drives the same actors as the WebSocket path)."""
from __future__ import annotations

import logging
import socket
from functools import partial

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from starlette.types import ASGIApp

from winkr.config import Settings
from winkr.preflight import bind_tcp

log = logging.getLogger("winkr.api")

GRACEFUL_SECONDS = 2.0  # in-flight requests may finish this long after the server stops


def bind_api(settings: Settings) -> list[socket.socket]:
    """Listening sockets for ``api_host``:``api_port`` (``StartupError`` when taken)."""
    assert settings.api_port is not None
    return bind_tcp(settings.api_host, settings.api_port, flag="--api-port")


def _config() -> Config:
    config = Config()
    config.errorlog = logging.getLogger("winkr.api.http")
    config.accesslog = None  # paths carry user ids: no access log
    config.graceful_timeout = GRACEFUL_SECONDS
    config.include_server_header = False
    config.keep_alive_timeout = 30
    # hypercorn closes a keep-alive connection after this many requests (default 1000), and its
    # trio worker then races its own close against the last response's send (a spurious
    # BusyResourceError traceback in the log, the response itself intact). One process has no
    # workers to rebalance connections between, so recycling buys nothing here.
    config.keep_alive_max_requests = 2**31
    return config


async def serve_api(app: ASGIApp, sockets: list[socket.socket], stop: trio.Event, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``sockets`` (bound and listening) until ``stop`` is set; in-flight
    requests then get ``GRACEFUL_SECONDS`` to finish. Reports the port once accepting."""
    port: int = sockets[0].getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(worker_serve, wrap_app(app, 0, "asgi"), _config(),  # type: ignore[arg-type]
                                    sockets=Sockets([], sockets, []), shutdown_trigger=stop.wait))
        task_status.started(port)
