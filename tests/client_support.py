"""Running ``winkr.client`` against the real server code in-process: a switchboard that hands
the client's connection attempts to whichever server is up (over trio's memory streams), can
drop every connection at once (a crash, as the clients see it), and records each attempt's
time so that backoff can be measured under MockClock."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing
from conftest import SECRET, named, start_server
from trio_websocket import WebSocketConnection, wrap_client_stream

from winkr.auth import mint_token
from winkr.client import Client, open_client
from winkr.clock import trio_wall_clock
from winkr.config import Settings
from winkr.server import Server

WALL = trio_wall_clock()  # the same wall clock as the harness servers (tokens, exp)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None


@attrs.define(eq=False)
class Board:
    settings: Settings
    server: Server | None = None
    attempts: list[tuple[float, str]] = attrs.Factory(list)  # (trio time, token)
    streams: list[trio.testing.MemorySendStream] = attrs.Factory(list)

    def token(self, user_id: str, *, ttl: float = 3600) -> str:
        return mint_token(self.settings, SECRET, user_id, ttl=ttl, now=WALL(), username=f"name-{user_id}")

    @asynccontextmanager
    async def connect(self, url: str, headers: list[tuple[str, str]],
                      timeout: float) -> AsyncIterator[WebSocketConnection]:
        """A ``winkr.client`` connector: this attempt goes to the running server, if any."""
        self.attempts.append((trio.current_time(), headers[0][1].removeprefix("Bearer ")))
        if self.server is None:
            raise OSError(111, "connection refused (no server running)")
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self.server.accept_stream(server_stream)
        self.streams.append(client_stream)
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(timeout):
                    ws = await wrap_client_stream(nursery, client_stream, "localhost", "/ws",
                                                  extra_headers=headers)
                try:
                    yield ws
                finally:
                    with trio.move_on_after(2):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # trio-websocket raises a refusal from its reader task
            single = _single(group)
            if single is None:
                raise
            raise single from None

    async def drop_all(self) -> None:
        """Cut every client connection at once, without a close frame (what a crash looks like)."""
        streams, self.streams = self.streams, []
        for stream in streams:
            await stream.aclose()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Server]:
        """A server on the board's settings (and database) for the body of the ``async with``."""
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, self.settings)
            self.server = server
            try:
                yield server
            finally:
                self.server = None
                server.request_shutdown()

    def client(self, token: Any, **options: Any) -> Any:
        """``open_client`` through this board (backoff jitter pinned to the window's ceiling)."""
        options.setdefault("random", lambda: 1.0)
        return open_client("ws://board/ws", token, connector=self.connect, wall_clock=WALL, **options)


@attrs.define(eq=False)
class Recorder:
    """What a client emitted: message seqs per conversation, every event name, states."""

    seqs: dict[str, list[int]] = attrs.Factory(dict)
    replayed: list[int] = attrs.Factory(list)
    events: list[dict[str, Any]] = attrs.Factory(list)
    states: list[str] = attrs.Factory(list)

    def attach(self, client: Client) -> Recorder:
        client.on("message:new", self._message)
        client.on("*", lambda _data, envelope: self.events.append(envelope))
        client.on("state", lambda state, _info: self.states.append(state))
        return self

    def _message(self, data: dict[str, Any], envelope: dict[str, Any]) -> None:
        message = data["message"]
        self.seqs.setdefault(message["conversation_id"], []).append(message["seq"])
        if envelope.get("replayed"):
            self.replayed.append(message["seq"])

    def named(self, event: str) -> list[dict[str, Any]]:
        return named(self.events, event)
