"""The server API's HTTP surface (contract §13): a Starlette app over ``winkr.api.operations``.

Every input is validated here (the body with the protocol's strict converter, path ids and
query numbers by hand) and every answer is JSON: success bodies as documented in
``winkr.api.openapi``; errors ``{"error": {"code", "message", "details"?}}`` with the status of
:data:`STATUS_BY_CODE`; unknown paths 404, wrong methods 405 (with ``Allow``), bodies over
``api_max_body_bytes`` 413. ``/healthz`` and ``/readyz`` need no key, nor does the OpenAPI
document; everything else needs ``Authorization: Bearer <key>``.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, unquote, unquote_to_bytes

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from winkr.api import operations
from winkr.api.keys import KeyChecker
from winkr.api.openapi import openapi_document
from winkr.errors import (
    CONNECTION_ERROR,
    CONVERSATION_FULL,
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_MESSAGE_TYPE,
    MESSAGE_TOO_LARGE,
    NOT_FOUND,
    RATE_LIMITED,
    UNAUTHORIZED,
    VALIDATION_ERROR,
    ProtocolError,
    retry_after_header,
)
from winkr.ids import MAX_ID_CHARS, user_id_problem
from winkr.logs import ThrottledLog
from winkr.protocol.requests import (
    MAX_HISTORY_LIMIT,
    ApiDisconnect,
    ApiSystemMessage,
    ConversationCreate,
    UserRef,
    structure_request,
)
from winkr.services import Services
from winkr.store.writer import store_problem

log = logging.getLogger("winkr.api")
_failures = ThrottledLog(log)

STATUS_BY_CODE = {VALIDATION_ERROR: 400, INVALID_MESSAGE_TYPE: 400, UNAUTHORIZED: 401, FORBIDDEN: 403,
                  NOT_FOUND: 404, CONVERSATION_FULL: 409, MESSAGE_TOO_LARGE: 413, RATE_LIMITED: 429,
                  CONNECTION_ERROR: 503, INTERNAL_ERROR: 500}
READY_STORE_SECONDS = 2.0  # /readyz: the store must commit an empty request within this

Readiness = Callable[[], "str | None"]
"""Why the server is not ready (shutting down, not listening), or None."""


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def error_response(exc: ProtocolError, headers: dict[str, str] | None = None) -> Response:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.details:
        error["details"] = exc.details
    headers = dict(headers or {})
    if exc.code == RATE_LIMITED and "retry_after" in exc.details:
        headers["retry-after"] = retry_after_header(float(exc.details["retry_after"]))
    if exc.code == UNAUTHORIZED:
        headers["www-authenticate"] = 'Bearer realm="winkr"'
    return _json({"error": error}, STATUS_BY_CODE.get(exc.code, 500), headers)


# --- input ------------------------------------------------------------------------------------


def _path_id(request: Request, name: str) -> str:
    """A path parameter, percent-decoded as UTF-8; bytes that are not UTF-8 are refused (decoded
    with replacements, ``%FF`` and ``%FE`` would both name the id ``"\ufffd"``)."""
    try:
        return unquote(request.path_params[name], errors="strict")
    except UnicodeDecodeError:
        raise ProtocolError(VALIDATION_ERROR, f"{name} must be percent-encoded UTF-8", field=name) from None


def _conversation_id(request: Request) -> str:
    value = _path_id(request, "conversation_id")
    if not 0 < len(value) <= MAX_ID_CHARS or not value.isprintable():
        raise ProtocolError(VALIDATION_ERROR, f"conversation_id must be a printable string of 1-{MAX_ID_CHARS} "
                            "characters", field="conversation_id")
    return value


def _user_id(request: Request, name: str = "user_id") -> str:
    value = _path_id(request, name)
    problem = user_id_problem(value)
    if problem is not None:
        raise ProtocolError(VALIDATION_ERROR, f"{name} {problem}", field=name)
    return value


def _query_int(request: Request, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise ProtocolError(VALIDATION_ERROR, f"{name} must be a non-negative integer", field=name)
    value = int(raw)
    if value < low or high is not None and value > high:
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ProtocolError(VALIDATION_ERROR, f"{name} must be {bound}", field=name)
    return value


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError(VALIDATION_ERROR, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(VALIDATION_ERROR, "the body must be a JSON object")
    return data


# --- the app ----------------------------------------------------------------------------------


class ServerApi:
    """The endpoints, bound to a running server's services."""

    def __init__(self, services: Services, keys: KeyChecker, readiness: Readiness) -> None:
        self.services = services
        self.keys = keys
        self.readiness = readiness
        self.openapi = orjson.dumps(openapi_document(services.settings))

    def app(self) -> ASGIApp:
        def route(path: str, **endpoints: Callable[[Request], Awaitable[Response]]) -> Route:
            """One route per path, its methods dispatched here (so 405 lists them all)."""
            guarded = {method: self._guarded(endpoint) for method, endpoint in endpoints.items()}

            async def dispatch(request: Request) -> Response:
                # Starlette routes HEAD to a GET route; only the methods given get here.
                return await guarded.get(request.method, guarded.get("GET", guarded[next(iter(guarded))]))(request)
            return Route(path, dispatch, methods=list(endpoints))

        routes = [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/v1/openapi.json", self.openapi_json, methods=["GET"]),
            route("/v1/conversations", POST=self.create_conversation),
            route("/v1/conversations/{conversation_id}", GET=self.get_conversation, DELETE=self.close_conversation),
            route("/v1/conversations/{conversation_id}/messages", POST=self.post_message, GET=self.history),
            route("/v1/users/{user_id}/disconnect", POST=self.disconnect),
            route("/v1/users/{user_id}/presence", GET=self.presence),
            route("/v1/users/{user_id}/conversations", GET=self.user_conversations),
            route("/v1/users/{user_id}/blocks", POST=self.block),
            route("/v1/users/{user_id}/blocks/{blocked_id}", DELETE=self.unblock),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
        app.router.redirect_slashes = False  # "/v1/conversations/" is no endpoint: 404, not a redirect
        return BodyLimit(PathSegments(app), self.services.settings.api_max_body_bytes)

    def _guarded(self, endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """The key check and the error mapping around one endpoint."""
        async def guarded(request: Request) -> Response:
            try:
                self._authenticate(request)
                return await endpoint(request)
            except ProtocolError as exc:
                return error_response(exc)
            except Exception as exc:  # the API's exception barrier: a bug answers 500, the server goes on
                _failures.exception(exc, "server API %s %s failed", request.method, request.url.path)
                return error_response(ProtocolError(INTERNAL_ERROR, "internal error"))
        return guarded

    def _authenticate(self, request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ProtocolError(UNAUTHORIZED, "missing API key: send Authorization: Bearer <key>")
        if not self.keys.accepts(key.strip()):
            raise ProtocolError(UNAUTHORIZED, "invalid API key")

    # --- no key ---------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        reason = self.readiness() or await store_problem(self.services.store, READY_STORE_SECONDS)
        if reason is not None:
            return _json({"status": "unavailable", "reason": reason}, 503)
        return _json({"status": "ready"})

    async def openapi_json(self, request: Request) -> Response:
        return Response(self.openapi, media_type="application/json")

    # --- conversations --------------------------------------------------------------------------

    async def create_conversation(self, request: Request) -> Response:
        body = structure_request(ConversationCreate, await _body(request))
        created = await operations.create_conversation(self.services, body.participant_ids)
        return _json({"conversation": created.conversation}, 201 if created.created else 200)

    async def get_conversation(self, request: Request) -> Response:
        return _json({"conversation": await operations.get_conversation(self.services, _conversation_id(request))})

    async def close_conversation(self, request: Request) -> Response:
        await operations.close_conversation(self.services, _conversation_id(request))
        return Response(status_code=204)

    async def post_message(self, request: Request) -> Response:
        conversation_id = _conversation_id(request)
        body = structure_request(ApiSystemMessage, await _body(request))
        posted = await operations.post_system_message(self.services, conversation_id, body)
        return _json({"message": posted.message}, 200 if posted.duplicate else 201)

    async def history(self, request: Request) -> Response:
        conversation_id = _conversation_id(request)
        before = _query_int(request, "before_seq", None, 0)
        after = _query_int(request, "after_seq", None, 0)
        limit = _query_int(request, "limit", 50, 1, MAX_HISTORY_LIMIT)
        assert limit is not None
        messages, has_more = await operations.history(self.services, conversation_id, before, after, limit)
        return _json({"messages": messages, "has_more": has_more})

    # --- users ----------------------------------------------------------------------------------

    async def disconnect(self, request: Request) -> Response:
        user_id = _user_id(request)
        body = structure_request(ApiDisconnect, await _body(request))
        closed = await operations.disconnect_user(self.services, user_id, body.revoke_tokens)
        return _json({"closed_connections": closed})

    async def presence(self, request: Request) -> Response:
        return _json(await operations.presence(self.services, _user_id(request)))

    async def user_conversations(self, request: Request) -> Response:
        listing = await operations.user_conversations(self.services, _user_id(request))
        return _json({"conversations": listing})

    async def block(self, request: Request) -> Response:
        blocker = _user_id(request)
        body = structure_request(UserRef, await _body(request))
        return _json(await operations.block(self.services, blocker, body.user_id), 201)

    async def unblock(self, request: Request) -> Response:
        blocker = _user_id(request)
        blocked = _user_id(request, "blocked_id")
        await operations.unblock(self.services, blocker, blocked)
        return Response(status_code=204)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no such path) and 405 (no such method here), as JSON errors."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = headers.get("Allow", "")
        body = {"error": {"code": VALIDATION_ERROR, "message": f"{request.method} is not allowed here; "
                                                               f"allowed: {allowed}"}}
        return _json(body, 405, headers)
    if exc.status_code == 404:
        return _json({"error": {"code": NOT_FOUND, "message": "no such endpoint: see /v1/openapi.json"}}, 404)
    return _json({"error": {"code": VALIDATION_ERROR, "message": str(exc.detail)}}, exc.status_code, headers)


class PathSegments:
    """Route on the raw path, one segment per id: an id may contain ``/`` (sent as ``%2F``)
    and still name one path parameter. Each segment of ``scope["path"]`` is re-encoded from
    ``raw_path``, and the endpoints decode their parameters (``unquote``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path")
            if isinstance(raw, bytes):
                path = raw.split(b"?", 1)[0].decode("latin-1")
                # unquote_to_bytes: bytes that are not UTF-8 stay as they are, for the endpoint to refuse.
                segments = [quote(unquote_to_bytes(part), safe="") for part in path.split("/")]
                scope = {**scope, "path": "/".join(segments)}
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413 ``MESSAGE_TOO_LARGE`` (announced by
    ``Content-Length`` or found while reading); read bodies are replayed to the app."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limit:
            await self.app(scope, receive, send)
            return
        too_large = ProtocolError(MESSAGE_TOO_LARGE, f"the request body is over {self.limit} bytes")
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(too_large, {"connection": "close"})(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await error_response(too_large, {"connection": "close"})(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
