"""The Python client (contract §15) on trio: the same behaviours as ``clients/js/winkr-client.js``.

One ``Client`` owns one supervisor task that connects, reads, and reconnects with full-jitter
exponential backoff; a writer task per connection sends queued frames in order; catch-up runs
in tasks of the client's nursery. ``message:new`` of a joined conversation is emitted exactly
once per message, in ``seq`` order (own messages included), across reconnects.
"""
from __future__ import annotations

import base64
import inspect
import itertools
import logging
import random as _random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)
from wsproto.utilities import LocalProtocolError

from winkr.client.cache import MemoryCache, Message, MessageCache

log = logging.getLogger("winkr.client")

Envelope = dict[str, Any]
TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]
Handler = Callable[[Any, Any], Any]
Connector = Callable[[str, list[tuple[str, str]], float], AbstractAsyncContextManager[WebSocketConnection]]
"""``(url, headers, connect_timeout)`` → an async context manager of an open WebSocket."""

STATES = ("connecting", "open", "reconnecting", "closed")
CATCH_UP_PAGE = 100
MAX_CATCH_UP_ROUNDS = 20
CACHE_BACKLOG = 1024
CLOSE_DISCONNECTED = 4004
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_SECONDS = 2.0
IDEMPOTENT = frozenset({"message:read", "message:history", "conversation:list", "conversation:leave",
                        "user:status", "user:settings"})


class WinkrError(Exception):
    """A refused request (the server's ``error``: code, message, details, envelope) or one of
    the client's own codes: ``TIMEOUT``, ``CONNECTION_ERROR`` (the connection ended before the
    reply, or could not be opened), ``CLOSED`` (the client is closed), ``MESSAGE_TOO_LARGE``
    (refused before sending)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None,
                 envelope: Envelope | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}
        self.envelope = envelope


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT in seconds, read without verifying (only to plan a refresh)."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
    except (IndexError, ValueError, AttributeError):
        return None


def default_connector(url: str, headers: list[tuple[str, str]],
                      connect_timeout: float) -> AbstractAsyncContextManager[WebSocketConnection]:
    """A real WebSocket (the token travels in ``Authorization``)."""
    return open_websocket_url(url, extra_headers=[(k.encode(), v.encode()) for k, v in headers],
                              subprotocols=["winkr.v1"],
                              connect_timeout=connect_timeout, disconnect_timeout=CLOSE_SECONDS)


@attrs.define(eq=False, kw_only=True)
class _Waiter:
    """A reply someone waits for: settled once, with the reply or the error."""

    done: trio.Event = attrs.Factory(trio.Event)
    reply: Envelope | None = None
    error: WinkrError | None = None

    def settle(self, reply: Envelope | None, error: WinkrError | None) -> None:
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()


@attrs.define(eq=False)
class _Pending(_Waiter):
    event: str
    data: dict[str, Any]
    order: int
    resend: bool = False  # sent again after a reconnect (idempotent requests)
    silent: bool = False  # the reply is not emitted (the client's own catch-up)
    stall_reconnects: bool = False  # no reply on an open connection = a dead connection
    fire_and_forget: bool = False  # typing: no ref, never queued across a reconnect
    bound: int | None = None  # the client's own catch-up: valid on this connection only
    ref: str | None = None
    generation: int = -1


@attrs.define(eq=False)
class _Sync:
    """Per joined conversation: what has been emitted, and what waits for a gap to fill."""

    last_seq: int | None = None
    syncing: bool = False
    buffer: dict[int, Envelope] = attrs.Factory(dict)
    waiters: list[_Waiter] = attrs.Factory(list)


class _Done:
    """What ``typing()`` returns: it has already done its work, and awaiting it is optional
    (``client.typing(c)`` and ``await client.typing(c)`` both work)."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # a generator that finishes at once


DONE = _Done()


@attrs.define(eq=False)
class _Burst:
    stop_at: float
    next_repeat: float


@attrs.define
class _Ending:
    """How one connection attempt or connection ended."""

    code: int | None = None  # close code (the server's connection:closed code first)
    reason: str = ""
    status: int | None = None  # HTTP status of a refused handshake
    body: Envelope | None = None
    retry_after: float = 0.0


class Client:
    """A connected (and reconnecting) winkr client; make one with ``open_client``."""

    def __init__(self, url: str, token: TokenSource, *, nursery: trio.Nursery, connect_timeout: float,
                 request_timeout: float, backoff_initial: float, backoff_max: float,
                 typing_stop_after: float, typing_repeat: float, refresh_margin: float,
                 max_frame_bytes: int, cache: MessageCache | None, connector: Connector,
                 random: Callable[[], float], wall_clock: Callable[[], float]) -> None:
        if not isinstance(token, str) and not callable(token):
            raise TypeError("token must be a string or a function returning one")
        self.url = url
        self._token = token
        self._nursery = nursery
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.typing_stop_after = typing_stop_after
        self.typing_repeat = typing_repeat
        self.refresh_margin = refresh_margin
        self.max_frame_bytes = max_frame_bytes
        self.cache: MessageCache = cache if cache is not None else MemoryCache()
        self._connector = connector
        self._random = random
        self._wall_clock = wall_clock
        self.user_id: str | None = None
        self._state = "closed"
        self._handlers: dict[str, list[Handler]] = {}
        self._ws: WebSocketConnection | None = None
        self._generation = 0
        self._established = False
        self._ever_established = False
        self._ended = False
        self._attempt = 0
        self._last_token: str | None = None
        self._refused_token: str | None = None
        self._closed_frame: Envelope | None = None
        self._first_error: WinkrError | None = None
        self._ready = trio.Event()
        self._session_nursery: trio.Nursery | None = None
        self._session_scope: trio.CancelScope | None = None
        self._supervisor_scope = trio.CancelScope()
        self._refs = itertools.count(1)
        self._orders = itertools.count()
        self._in_flight: dict[str, _Pending] = {}
        self._outbox: deque[_Pending] = deque()
        self._outbox_ready = trio.Event()
        self._joined: dict[str, _Sync] = {}
        self._typing: dict[str, _Burst] = {}
        self._people: dict[str, dict[str, Any]] = {}
        self._cache_in, self._cache_out = trio.open_memory_channel[tuple[str, list[Message]]](CACHE_BACKLOG)

    # --- public API ------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``connecting``, ``open``, ``reconnecting`` or ``closed``."""
        return self._state

    @property
    def joined(self) -> list[str]:
        """The conversations kept joined (joined again after every reconnect)."""
        return list(self._joined)

    def on(self, event: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(data, envelope)`` for every server event of that protocol name (``"*"``:
        every event); ``"state"`` calls ``handler(state, {"previous", "code", "reason"})``.
        Handlers run in the client's reader task: they must not block. Returns a function
        that removes the handler."""
        self._handlers.setdefault(event, []).append(handler)
        return lambda: self.off(event, handler)

    def off(self, event: str, handler: Handler | None = None) -> None:
        """Remove a handler (or every handler of the event)."""
        if handler is None:
            self._handlers.pop(event, None)
        elif handler in self._handlers.get(event, []):
            self._handlers[event].remove(handler)

    async def request(self, event: str, data: dict[str, Any] | None = None, *,
                      timeout: float | None = None) -> Envelope:  # noqa: ASYNC109 - contract §15
        """Send any client event and return its direct reply envelope (matched by ``ref``).
        Raises ``WinkrError``: the server's ``error``; ``TIMEOUT`` after ``timeout`` seconds
        (default ``request_timeout``) counted from the call; ``CONNECTION_ERROR`` when the
        connection ends before the reply (read-only requests are sent again instead);
        ``CLOSED``. While reconnecting, the request waits for the connection. Cancelling
        the caller withdraws a request not yet sent."""
        return await self._request(event, data or {}, resend=event in IDEMPOTENT,
                                   wait=self.request_timeout if timeout is None else timeout)

    async def send_message(self, conversation_id: str, content: str | None, *, type: str = "text",
                           metadata: dict[str, Any] | None = None,
                           client_message_id: str | None = None) -> Message:
        """Send a message and return it as stored. While disconnected it waits and is sent
        after reconnecting; it always carries a ``client_message_id`` (yours or a new uuid4),
        so a resend never duplicates it. Raises ``WinkrError`` on a refusal
        (``RATE_LIMITED``, …) or ``CLOSED``. It has no deadline of its own: wrap it in
        ``trio.move_on_after`` to give up (sending again with the same ``client_message_id``
        is always safe)."""
        self.stop_typing(conversation_id)
        data = {"conversation_id": conversation_id, "content": content, "type": type,
                "metadata": metadata or {}, "client_message_id": client_message_id or str(uuid.uuid4())}
        reply = await self._request("message:send", data, resend=True, wait=None, stall_reconnects=True)
        message: Message = reply["data"]["message"]
        return message

    async def join(self, conversation_id: str) -> Envelope:
        """Join the conversation's room and keep it joined across reconnects, catching up
        missed messages as ``message:new``. Returns the ``conversation:joined`` envelope once
        joined and caught up; raises ``WinkrError`` when refused (then it is not re-joined)."""
        self._check_usable()
        sync = self._joined.get(conversation_id)
        if sync is None:
            sync = self._joined[conversation_id] = _Sync()
        waiter = _Waiter()
        sync.waiters.append(waiter)
        if self._is_open() and not sync.syncing:
            self._nursery.start_soon(self._sync_conversation, conversation_id, sync)
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        assert waiter.reply is not None
        return waiter.reply

    async def leave(self, conversation_id: str) -> Envelope | None:
        """Leave the room and stop re-joining it; the ``conversation:left`` envelope."""
        sync = self._joined.pop(conversation_id, None)
        self.stop_typing(conversation_id)
        for waiter in sync.waiters if sync else []:
            waiter.settle(None, WinkrError("CLOSED", "left the conversation"))
        if self._ended:
            return None
        return await self._request("conversation:leave", {"conversation_id": conversation_id},
                                   resend=True, wait=self.request_timeout)

    async def mark_read(self, conversation_id: str, message_id: str) -> Envelope:
        """Read every message up to and including ``message_id``; the ``message:viewed`` reply."""
        return await self._request("message:read", {"conversation_id": conversation_id,
                                                    "message_id": message_id},
                                   resend=True, wait=self.request_timeout)

    def typing(self, conversation_id: str) -> Awaitable[None]:
        """Call on every keystroke: ``typing:start`` once per burst (again every
        ``typing_repeat`` s during a long one), ``typing:stop`` after ``typing_stop_after`` s
        without a call. Does nothing while disconnected. Not a coroutine: it never blocks,
        and awaiting what it returns is optional."""
        if not self._is_open() or self._session_nursery is None:
            return DONE
        now = trio.current_time()
        burst = self._typing.get(conversation_id)
        if burst is not None:
            burst.stop_at = now + self.typing_stop_after
            return DONE
        burst = self._typing[conversation_id] = _Burst(now + self.typing_stop_after, now + self.typing_repeat)
        self._send_frame("typing:start", conversation_id)
        self._session_nursery.start_soon(self._run_burst, conversation_id, burst)
        return DONE

    def stop_typing(self, conversation_id: str) -> Awaitable[None]:
        """End a typing burst now (sending a message does this too); awaiting is optional."""
        if self._typing.pop(conversation_id, None) is not None and self._is_open():
            self._send_frame("typing:stop", conversation_id)
        return DONE

    async def history(self, conversation_id: str, *, before_seq: int | None = None,
                      after_seq: int | None = None, limit: int | None = None) -> dict[str, Any]:
        """One page of history, ``{"messages": [... ascending seq], "has_more": bool}``
        (docs/protocol.md §3.4); the messages also go to the cache."""
        data: dict[str, Any] = {"conversation_id": conversation_id}
        for key, value in (("before_seq", before_seq), ("after_seq", after_seq), ("limit", limit)):
            if value is not None:
                data[key] = value
        reply = await self._request("message:history", data, resend=True, wait=self.request_timeout)
        messages = reply["data"]["messages"]
        await self._cache_put_now(conversation_id, messages)
        return {"messages": messages, "has_more": reply["data"]["has_more"]}

    async def close(self) -> None:
        """Close the connection and stop everything (reconnects, timers, catch-up); pending
        requests raise ``CLOSED``. Idempotent; takes at most ~2 s for the close handshake."""
        if self._ended:
            return
        ws = self._ws
        self._finish(WinkrError("CLOSED", "the client was closed"), _Ending(1000, "client_closed"))
        if ws is not None:
            with trio.move_on_after(CLOSE_SECONDS):
                await ws.aclose(1000, "client closed")
        self._supervisor_scope.cancel()

    # --- the supervisor: connect, read, reconnect -------------------------------------

    def _is_open(self) -> bool:
        return self._ws is not None and self._established and not self._ended

    def _is_ended(self) -> bool:
        return self._ended

    def _check_usable(self) -> None:
        if self._ended:
            raise WinkrError("CLOSED", "the client was closed")

    async def _run(self) -> None:
        """Connect until ``close()`` or a refusal that will not change."""
        with self._supervisor_scope:
            self._set_state("connecting")
            while not self._ended:
                ending = await self._connect_once()
                if self._is_ended():  # close() ran meanwhile
                    return
                if not self._ever_established:
                    self._first_error = self._first_failure(ending)
                    self._finish(self._first_error, ending)
                    return
                refusal = self._permanent_refusal(ending)
                if refusal is not None:
                    self._finish(WinkrError("CLOSED", refusal, {"code": ending.code, "status": ending.status}),
                                 ending)
                    return
                self._set_state("reconnecting", ending)
                self._attempt += 1
                ceiling = min(self.backoff_max, self.backoff_initial * 2 ** (self._attempt - 1))
                await trio.sleep(max(self._random() * ceiling, ending.retry_after))  # full jitter

    async def _connect_once(self) -> _Ending:
        self._generation += 1
        try:
            token = await self._get_token()
        except Exception as exc:  # noqa: BLE001 - the app's token function failed: retry later
            return _Ending(reason=f"token function failed: {exc!r}")
        if token == self._refused_token:
            return _Ending(status=401, reason="the token function returned the refused token again")
        self._last_token = token
        self._closed_frame = None
        ending: _Ending | None = None
        try:
            async with self._connector(self.url, [("Authorization", f"Bearer {token}")],
                                       self.connect_timeout) as ws:
                ending = await self._session(ws, self._generation)
        except ConnectionRejected as exc:
            ending = self._refused(exc, token)
        except (HandshakeError, OSError, ConnectionClosed) as exc:
            if ending is None:
                ending = _Ending(reason=f"cannot connect: {exc!r}")
        except LocalProtocolError as exc:
            # trio-websocket answering a ping that crossed our close frame (wsproto refuses a
            # pong once it is out): the connection ends all the same, as it was going to.
            if ending is None:
                ending = _Ending(reason=f"closed: {exc!r}")
        self._connection_lost()
        return ending

    def _refused(self, exc: ConnectionRejected, token: str) -> _Ending:
        body: Envelope | None = None
        try:
            body = orjson.loads(exc.body) if exc.body else None
        except orjson.JSONDecodeError:
            pass
        details = ((body or {}).get("data") or {}).get("details") or {}
        retry_after = details.get("retry_after") if isinstance(details, dict) else None
        if exc.status_code == 401:
            self._refused_token = token
        return _Ending(status=exc.status_code, body=body, reason=f"handshake refused: HTTP {exc.status_code}",
                       retry_after=float(retry_after) if isinstance(retry_after, (int, float)) else 0.0)

    async def _session(self, ws: WebSocketConnection, generation: int) -> _Ending:
        """Serve one open socket until it closes; returns how it ended."""
        self._ws = ws
        ending = _Ending()
        async with trio.open_nursery() as nursery:
            self._session_nursery = nursery
            try:
                with trio.CancelScope() as scope:
                    self._session_scope = scope
                    try:
                        with trio.fail_after(self.connect_timeout):
                            await self._receive(await ws.get_message(), generation)
                        while self._established:
                            await self._receive(await ws.get_message(), generation)
                        ending.reason = "the server did not say connection:established"
                    except ConnectionClosed as exc:
                        if exc.reason is not None:
                            ending.code, ending.reason = exc.reason.code, exc.reason.reason or ""
                    except trio.TooSlowError:
                        ending.reason = "no connection:established in time"
                if scope.cancelled_caught:
                    ending.reason = "no reply: the connection is taken for dead"
            finally:
                nursery.cancel_scope.cancel()
        if self._closed_frame is not None:
            ending.code = self._closed_frame["data"].get("code", ending.code)
            ending.reason = self._closed_frame["data"].get("reason", ending.reason)
        return ending

    def _first_failure(self, ending: _Ending) -> WinkrError:
        data = (ending.body or {}).get("data") or {}
        if ending.status is not None and data.get("code"):
            return WinkrError(data["code"], data.get("message", ""), data.get("details") or {}, ending.body)
        return WinkrError("CONNECTION_ERROR", f"could not connect to {self.url}: {ending.reason}",
                          {"code": ending.code, "status": ending.status})

    def _permanent_refusal(self, ending: _Ending) -> str | None:
        has_function = callable(self._token)
        if ending.code == CLOSE_DISCONNECTED:
            return "disconnected by the server (4004)"
        if ending.code == CLOSE_TOKEN_EXPIRED and not has_function:
            return "the token expired and there is no token function"
        if ending.status == 401 and (not has_function or self._last_token == self._refused_token):
            return "the token was refused (401) and no other token is available"
        if ending.status in (403, 404):
            return f"the handshake was refused with HTTP {ending.status}"
        if not has_function and self._last_token is not None:
            exp = token_expiry(self._last_token)
            if exp is not None and exp <= self._wall_clock():
                return "the token expired and there is no token function"
        return None

    async def _get_token(self) -> str:
        if isinstance(self._token, str):
            return self._token
        token = self._token()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise ValueError("the token function returned no token")
        return token

    def _on_established(self, envelope: Envelope, generation: int) -> None:
        self._established = True
        self._ever_established = True
        self._attempt = 0
        self._refused_token = None
        self.user_id = envelope["data"].get("user_id")
        self._set_state("open")
        self._emit(envelope)
        self._ready.set()
        assert self._session_nursery is not None and self._ws is not None
        self._session_nursery.start_soon(self._writer, self._ws, generation)
        if callable(self._token):
            self._session_nursery.start_soon(self._refresh_loop, generation)
        for conversation_id, sync in list(self._joined.items()):
            self._nursery.start_soon(self._sync_conversation, conversation_id, sync)
        self._wake_writer()

    def _connection_lost(self) -> None:
        """Settle what was in flight on the socket that just ended."""
        self._generation += 1
        self._ws = None
        self._established = False
        self._session_nursery = None
        self._session_scope = None
        self._typing.clear()  # the server ends a closed connection's typing itself
        for sync in self._joined.values():
            sync.syncing = False
            sync.buffer.clear()
        again = []
        for pending in self._in_flight.values():
            if pending.resend:
                pending.ref, pending.generation = None, -1
                again.append(pending)
            else:
                pending.settle(None, WinkrError("CONNECTION_ERROR", "the connection closed before the reply"))
        self._in_flight.clear()
        waiting = []
        for pending in self._outbox:
            if pending.bound is not None:
                pending.settle(None, WinkrError("CONNECTION_ERROR", "the connection closed before sending"))
            elif not pending.fire_and_forget and not pending.done.is_set():
                waiting.append(pending)
        self._outbox = deque(sorted(again + waiting, key=lambda p: p.order))

    def _finish(self, error: WinkrError, ending: _Ending) -> None:
        """The end: state closed, everything pending settled with ``error``."""
        if self._ended:
            return
        self._ended = True
        self._generation += 1
        self._typing.clear()
        for pending in [*self._in_flight.values(), *self._outbox]:
            pending.settle(None, error)
        self._in_flight.clear()
        self._outbox.clear()
        for sync in self._joined.values():
            for waiter in sync.waiters:
                waiter.settle(None, error)
            sync.waiters.clear()
        if self._session_scope is not None:
            self._session_scope.cancel()
        self._ready.set()
        self._set_state("closed", ending)

    # --- receiving -------------------------------------------------------------------

    async def _receive(self, raw: str | bytes, generation: int) -> None:
        try:
            envelope = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(envelope, dict) or not isinstance(envelope.get("event"), str):
            return
        if generation != self._generation or self._ended:
            return
        if not isinstance(envelope.get("data"), dict):
            envelope["data"] = {}
        event, data = envelope["event"], envelope["data"]
        if event == "connection:established":
            self._on_established(envelope, generation)
            return
        if event == "connection:closed":
            self._closed_frame = envelope
        self._learn_people(envelope)
        ref = envelope.get("ref")
        pending = self._in_flight.pop(ref, None) if isinstance(ref, str) else None
        if pending is not None:
            if event == "error":
                pending.settle(None, WinkrError(data.get("code", "INTERNAL_ERROR"), data.get("message", ""),
                                                data.get("details") or {}, envelope))
            else:
                pending.settle(envelope, None)
            if pending.silent:
                return
        if event == "message:new":
            self._sequence(envelope)
            return
        if event == "conversation:closed":  # unmatched or blocked: never re-join it
            sync = self._joined.pop(data.get("conversation_id"), None)
            self._typing.pop(data.get("conversation_id"), None)
            for waiter in sync.waiters if sync else []:
                waiter.settle(None, WinkrError("NOT_FOUND", "the conversation was closed"))
        if event == "message:deleted":
            await self._cache_update(data.get("conversation_id", ""), data.get("message_id", ""), {
                "is_deleted": True, "content": "", "metadata": {}, "updated_at": data.get("deleted_at")})
        self._emit(envelope)

    def _learn_people(self, envelope: Envelope) -> None:
        data = envelope["data"]
        sender = data.get("sender")
        if envelope["event"] == "message:new" and isinstance(sender, dict) and sender.get("id"):
            self._people[sender["id"]] = sender
        if envelope["event"] == "conversation:list":
            for conversation in data.get("conversations") or []:
                for person in conversation.get("participants") or []:
                    self._people[person["id"]] = {"id": person["id"], "username": person.get("username"),
                                                  "avatar_url": person.get("avatar_url")}

    # --- exactly once, in order ------------------------------------------------------

    def _sequence(self, envelope: Envelope) -> None:
        message = envelope["data"].get("message") or {}
        conversation_id = message.get("conversation_id")
        if not isinstance(conversation_id, str):
            self._emit(envelope)
            return
        sync = self._joined.get(conversation_id)
        if sync is None or not isinstance(message.get("seq"), int):
            self._cache_put(conversation_id, [message])
            self._emit(envelope)
            return
        seq = message["seq"]
        if sync.last_seq is not None and seq <= sync.last_seq:
            return  # emitted already
        if sync.syncing or sync.last_seq is None:
            sync.buffer[seq] = envelope
        elif seq == sync.last_seq + 1:
            self._deliver(sync, envelope)
            self._drain(sync)
        else:  # a gap: fetch what is missing
            sync.buffer[seq] = envelope
            self._nursery.start_soon(self._catch_up, conversation_id, sync, self._generation)

    def _deliver(self, sync: _Sync, envelope: Envelope) -> None:
        message = envelope["data"]["message"]
        sync.last_seq = message["seq"]
        self._cache_put(message["conversation_id"], [message])
        self._emit(envelope)

    def _drain(self, sync: _Sync) -> None:
        for seq in sorted(sync.buffer):
            if sync.last_seq is not None and seq <= sync.last_seq:
                del sync.buffer[seq]
            elif sync.last_seq is not None and seq == sync.last_seq + 1:
                self._deliver(sync, sync.buffer.pop(seq))
            else:
                break

    async def _sync_conversation(self, conversation_id: str, sync: _Sync) -> None:
        """Join on this connection and catch up; then release the ``join()`` callers."""
        if sync.syncing or self._joined.get(conversation_id) is not sync or not self._is_open():
            return
        generation = self._generation
        sync.syncing = True
        try:
            joined = await self._request("conversation:join", {"conversation_id": conversation_id},
                                         resend=False, wait=self.request_timeout, stall_reconnects=True,
                                         bound=generation)
            if sync.last_seq is None:
                cached = await self._cache_last_seq(conversation_id)
                if cached is not None and sync.last_seq is None:
                    sync.last_seq = cached
            if sync.last_seq is None:  # nothing known: start from the newest message
                page = await self._request("message:history", {"conversation_id": conversation_id, "limit": 1},
                                           resend=False, silent=True, wait=self.request_timeout,
                                           stall_reconnects=True, bound=generation)
                messages = page["data"]["messages"]
                self._cache_put(conversation_id, messages)
                if sync.last_seq is None:
                    sync.last_seq = messages[-1]["seq"] if messages else 0
        except WinkrError as exc:
            if generation != self._generation or self._joined.get(conversation_id) is not sync:
                return
            sync.syncing = False
            if exc.envelope is not None:  # refused: the conversation is gone, stop re-joining it
                del self._joined[conversation_id]
                for waiter in sync.waiters:
                    waiter.settle(None, exc)
                sync.waiters.clear()
            return
        if generation != self._generation:
            return  # the connection ended meanwhile; the next one joins again
        sync.syncing = False
        await self._catch_up(conversation_id, sync, generation)
        if generation == self._generation and self._joined.get(conversation_id) is sync:
            for waiter in sync.waiters:
                waiter.settle(joined, None)
            sync.waiters.clear()

    async def _catch_up(self, conversation_id: str, sync: _Sync, generation: int) -> None:
        """Emit every message after ``last_seq`` once and in order, then the buffered live
        ones; repeat while a gap is left (bounded: a message that never shows up is skipped)."""
        if sync.syncing or sync.last_seq is None or generation != self._generation:
            return
        sync.syncing = True
        try:
            rounds = 0
            while rounds < MAX_CATCH_UP_ROUNDS:
                rounds += 1
                page = await self._request("message:history", {
                    "conversation_id": conversation_id, "after_seq": sync.last_seq, "limit": CATCH_UP_PAGE},
                    resend=False, silent=True, wait=self.request_timeout, stall_reconnects=True,
                    bound=generation)
                if generation != self._generation or self._joined.get(conversation_id) is not sync:
                    return
                for message in page["data"]["messages"]:
                    if message["seq"] <= sync.last_seq:
                        continue
                    live = sync.buffer.pop(message["seq"], None)
                    self._deliver(sync, live or self._replayed(message))
                self._drain(sync)
                if page["data"]["has_more"]:
                    rounds = 0
                elif not sync.buffer:
                    break
        except WinkrError:
            pass  # the connection ended (the reconnect catches up again) or the server refused
        finally:
            if generation == self._generation and self._joined.get(conversation_id) is sync:
                sync.syncing = False
                for seq in sorted(sync.buffer):  # order over completeness for a gap that never fills
                    if sync.last_seq is None or seq > sync.last_seq:
                        self._deliver(sync, sync.buffer[seq])
                sync.buffer.clear()

    def _replayed(self, message: Message) -> Envelope:
        sender = self._people.get(message["sender_id"]) or {
            "id": message["sender_id"], "username": message["sender_id"], "avatar_url": None}
        return {"event": "message:new", "data": {"message": message, "sender": sender},
                "timestamp": message.get("created_at"), "replayed": True}

    # --- sending ---------------------------------------------------------------------

    async def _request(self, event: str, data: dict[str, Any], *, resend: bool, wait: float | None,
                       silent: bool = False, stall_reconnects: bool = False,
                       bound: int | None = None) -> Envelope:
        self._check_usable()
        if bound is not None and (bound != self._generation or not self._is_open()):
            raise WinkrError("CONNECTION_ERROR", "the connection closed")
        size = len(orjson.dumps({"event": event, "data": data, "ref": "w0000000000"}))
        if self.max_frame_bytes and size > self.max_frame_bytes:
            raise WinkrError("MESSAGE_TOO_LARGE",
                             f"the frame would be {size} bytes; the server accepts {self.max_frame_bytes}")
        pending = _Pending(event, data, next(self._orders), resend=resend, silent=silent,
                           stall_reconnects=stall_reconnects, bound=bound)
        self._outbox.append(pending)
        self._wake_writer()
        try:
            with trio.fail_after(wait) if wait is not None else nullcontext():
                await pending.done.wait()
        except trio.TooSlowError:
            pending.settle(None, WinkrError("TIMEOUT", f"no reply to {event} within {wait} s"))
        finally:
            if not pending.done.is_set():  # cancelled: withdraw it
                pending.settle(None, WinkrError("CLOSED", "the request was cancelled"))
            if pending.ref is not None:
                self._in_flight.pop(pending.ref, None)
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    def _send_frame(self, event: str, conversation_id: str) -> None:
        """A frame without a reply (typing): sent if open, never queued across a reconnect."""
        self._outbox.append(_Pending(event, {"conversation_id": conversation_id}, next(self._orders),
                                     fire_and_forget=True))
        self._wake_writer()

    def _wake_writer(self) -> None:
        self._outbox_ready.set()

    async def _writer(self, ws: WebSocketConnection, generation: int) -> None:
        """Send queued frames in order, for as long as this connection lives."""
        try:
            while generation == self._generation:
                if not self._outbox:
                    self._outbox_ready = trio.Event()
                    await self._outbox_ready.wait()
                    continue
                pending = self._outbox.popleft()
                if pending.done.is_set():
                    continue
                frame: dict[str, Any] = {"event": pending.event, "data": pending.data}
                if not pending.fire_and_forget:
                    pending.ref = frame["ref"] = f"w{next(self._refs)}"
                    pending.generation = generation
                    self._in_flight[pending.ref] = pending
                await ws.send_message(orjson.dumps(frame).decode())
                if pending.stall_reconnects and self._session_nursery is not None:
                    self._session_nursery.start_soon(self._watch_stall, pending, generation)
        except ConnectionClosed:
            return  # the reader sees the close and settles what was in flight

    async def _watch_stall(self, pending: _Pending, generation: int) -> None:
        with trio.move_on_after(self.request_timeout):
            await pending.done.wait()
            return
        if generation == self._generation and self._session_scope is not None:
            log.info("no reply within %.1f s: reconnecting", self.request_timeout)
            self._session_scope.cancel()

    # --- typing, refresh ---------------------------------------------------------------

    async def _run_burst(self, conversation_id: str, burst: _Burst) -> None:
        while self._typing.get(conversation_id) is burst:
            await trio.sleep_until(min(burst.stop_at, burst.next_repeat))
            if self._typing.get(conversation_id) is not burst:
                return
            now = trio.current_time()
            if now >= burst.stop_at:
                self.stop_typing(conversation_id)
                return
            if now >= burst.next_repeat:  # keep the server's 6 s expiry from firing mid-burst
                self._send_frame("typing:start", conversation_id)
                burst.next_repeat += self.typing_repeat

    async def _refresh_loop(self, generation: int) -> None:
        while generation == self._generation and self._last_token is not None:
            exp = token_expiry(self._last_token)
            if exp is None:
                return
            left = exp - self._wall_clock()
            await trio.sleep(max(0.0, left - min(self.refresh_margin, left / 2)))
            try:
                token = await self._get_token()
                await self._request("auth:refresh", {"token": token}, resend=False,
                                    wait=self.request_timeout)
            except Exception as exc:  # noqa: BLE001 - the app's token function, or a refusal
                log.info("auth:refresh failed (%s); the server will close at exp and the client "
                         "reconnects with a fresh token", getattr(exc, "code", "token"))
                return
            self._last_token = token

    # --- events and cache --------------------------------------------------------------

    def _set_state(self, state: str, ending: _Ending | None = None) -> None:
        previous, self._state = self._state, state
        if previous != state:
            info = {"previous": previous, "code": ending.code if ending else None,
                    "reason": ending.reason if ending else None}
            self._call("state", state, info)

    def _emit(self, envelope: Envelope) -> None:
        self._call(envelope["event"], envelope["data"], envelope)
        self._call("*", envelope["data"], envelope)

    def _call(self, event: str, data: Any, envelope: Any) -> None:
        for handler in list(self._handlers.get(event, ())):
            try:
                handler(data, envelope)
            except Exception:  # an app's broken handler must not break the client
                log.exception("a handler for %s raised", event)

    def _cache_put(self, conversation_id: str, messages: list[Message]) -> None:
        if messages:
            try:
                self._cache_in.send_nowait((conversation_id, messages))
            except trio.WouldBlock:
                log.debug("cache backlog full: a cache write was skipped")

    async def _cache_writer(self) -> None:
        async for conversation_id, messages in self._cache_out:
            await self._cache_put_now(conversation_id, messages)

    async def _cache_put_now(self, conversation_id: str, messages: list[Message]) -> None:
        try:
            await self.cache.put(conversation_id, messages)
        except Exception:  # the cache is best effort
            log.exception("cache put failed")

    async def _cache_update(self, conversation_id: str, message_id: str, patch: dict[str, Any]) -> None:
        try:
            await self.cache.update(conversation_id, message_id, patch)
        except Exception:
            log.exception("cache update failed")

    async def _cache_last_seq(self, conversation_id: str) -> int | None:
        try:
            seq = await self.cache.last_seq(conversation_id)
        except Exception:
            log.exception("cache last_seq failed")
            return None
        return seq if isinstance(seq, int) else None


@asynccontextmanager
async def open_client(url: str, token: TokenSource, *, connect_timeout: float = 10.0,
                      request_timeout: float = 10.0, backoff_initial: float = 1.0,
                      backoff_max: float = 30.0, typing_stop_after: float = 3.0,
                      typing_repeat: float = 4.0, refresh_margin: float = 60.0,
                      max_frame_bytes: int = 32768, cache: MessageCache | None = None,
                      connector: Connector = default_connector,
                      random: Callable[[], float] = _random.random,
                      wall_clock: Callable[[], float] = time.time) -> AsyncIterator[Client]:
    """Connect to ``url`` (``ws://host:port/ws``) and yield a ``Client`` once the server said
    ``connection:established``; close it when the block ends.

    ``token`` is a JWT string or a (sync or async) function returning one, called before every
    connection attempt and for ``auth:refresh`` before ``exp``. Times are seconds. If the first
    attempt fails (within ``connect_timeout``), this raises ``WinkrError`` (the handshake
    refusal's code, e.g. ``UNAUTHORIZED``, or ``CONNECTION_ERROR``) and retries nothing; once
    connected the client reconnects by itself (backoff from ``backoff_initial`` up to
    ``backoff_max``, full jitter) until ``close()``, 4004, or a token that cannot be renewed.
    ``connector`` replaces the transport (tests use in-memory streams)."""
    first_error: WinkrError | None = None
    try:
        async with trio.open_nursery() as nursery:
            client = Client(url, token, nursery=nursery, connect_timeout=connect_timeout,
                            request_timeout=request_timeout, backoff_initial=backoff_initial,
                            backoff_max=backoff_max, typing_stop_after=typing_stop_after,
                            typing_repeat=typing_repeat, refresh_margin=refresh_margin,
                            max_frame_bytes=max_frame_bytes, cache=cache, connector=connector,
                            random=random, wall_clock=wall_clock)
            nursery.start_soon(client._cache_writer)
            nursery.start_soon(client._run)
            try:
                await client._ready.wait()
                first_error = client._first_error
                if first_error is None:
                    yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps what the caller's block raised: give the caller its own exception.
        leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    if first_error is not None:
        raise first_error


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


__all__ = ["STATES", "Client", "Connector", "MessageCache", "MemoryCache", "TokenSource", "WinkrError",
           "open_client", "token_expiry"]
