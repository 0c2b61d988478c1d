"""The OpenAPI 3.1 document of the server API (``GET /v1/openapi.json``).

Written by hand next to the code it describes (``winkr.api.app``); the test suite checks the
live service against it with schemathesis (tests/test_api_schema.py), so a response that
drifts from it fails there. Limits in it come from the running server's settings.
"""
from __future__ import annotations

from typing import Any

from winkr import __version__
from winkr.config import Settings
from winkr.ids import MAX_ID_CHARS
from winkr.protocol.requests import MAX_HISTORY_LIMIT

Json = dict[str, Any]

ERROR_CODES = ["VALIDATION_ERROR", "INVALID_MESSAGE_TYPE", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND",
               "CONVERSATION_FULL", "MESSAGE_TOO_LARGE", "RATE_LIMITED", "INTERNAL_ERROR"]
TIMESTAMP = {"type": "string", "format": "date-time",
             "description": "RFC 3339, UTC, milliseconds and Z: 2026-11-30T12:00:00.000Z"}
NULLABLE_TIMESTAMP = {"type": ["string", "null"], "format": "date-time"}


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: Json, description: str) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR_TEXT = {
    400: "VALIDATION_ERROR (details.field names the input) or INVALID_MESSAGE_TYPE",
    401: "UNAUTHORIZED: no or a wrong API key",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    409: "CONVERSATION_FULL",
    413: "MESSAGE_TOO_LARGE: a body over the limit, or content too long",
    429: "RATE_LIMITED (details.retry_after, details.limit; Retry-After header)",
    500: "INTERNAL_ERROR",
}


def _errors(*statuses: int) -> Json:
    base = {status: _json_body(_ref("Error"), _ERROR_TEXT[status]) for status in (400, 401, 500, *statuses)}
    return {str(status): value for status, value in sorted(base.items())}


def _op(summary: str, responses: Json, *, params: list[Json] | None = None, body: Json | None = None,
        body_required: bool = True, public: bool = False, operation_id: str = "") -> Json:
    op: Json = {"summary": summary, "operationId": operation_id, "responses": responses}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
    if public:
        op["security"] = []
    return op


def _path_param(name: str, description: str) -> Json:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}}


def _query_int(name: str, description: str, minimum: int, maximum: int | None = None) -> Json:
    schema: Json = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def openapi_document(settings: Settings) -> Json:
    """The document for a server running with ``settings``."""
    conversation_id = _path_param("conversation_id", "a conversation id")
    user_id = _path_param("user_id", "a user id (a token's sub); percent-encode '/' as %2F")
    id_schema = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}
    schemas: Json = {
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string", "enum": ERROR_CODES}, "message": {"type": "string"},
                               "details": {"type": "object",
                                           "description": "field (a dotted path), retry_after, limit"}}}},
        },
        "Conversation": {
            "type": "object", "required": ["id", "participant_ids", "created_at"],
            "properties": {"id": {"type": "string"}, "participant_ids": {"type": "array", "items": {"type": "string"}},
                           "created_at": TIMESTAMP},
        },
        "ConversationState": {
            "type": "object", "required": ["id", "participant_ids", "created_at", "closed_at", "last_seq"],
            "properties": {"id": {"type": "string"}, "participant_ids": {"type": "array", "items": {"type": "string"}},
                           "created_at": TIMESTAMP, "closed_at": NULLABLE_TIMESTAMP,
                           "last_seq": {"type": "integer", "minimum": 0}},
        },
        "Message": {
            "type": "object",
            "required": ["id", "conversation_id", "seq", "sender_id", "type", "content", "metadata", "created_at",
                         "updated_at", "is_read", "is_deleted"],
            "properties": {"id": {"type": "string", "description": "<conversation_id>.<seq>"},
                           "conversation_id": {"type": "string"}, "seq": {"type": "integer", "minimum": 1},
                           "sender_id": {"type": "string"}, "type": {"type": "string"}, "content": {"type": "string"},
                           "metadata": {"type": "object"}, "client_message_id": {"type": "string"},
                           "created_at": TIMESTAMP, "updated_at": TIMESTAMP, "is_read": {"type": "boolean"},
                           "is_deleted": {"type": "boolean"}},
        },
        "MessageSummary": {
            "type": "object", "required": ["id", "seq", "content", "type", "sender_id", "created_at", "is_deleted"],
            "properties": {"id": {"type": "string"}, "seq": {"type": "integer"}, "content": {"type": "string"},
                           "type": {"type": "string"}, "sender_id": {"type": "string"}, "created_at": TIMESTAMP,
                           "is_deleted": {"type": "boolean"}},
        },
        "ConversationListing": {
            "type": "object", "required": ["id", "participants", "unread_count", "last_message"],
            "properties": {
                "id": {"type": "string"},
                "participants": {"type": "array", "items": {
                    "type": "object", "required": ["id", "username", "avatar_url", "online", "last_seen_at"],
                    "properties": {"id": {"type": "string"}, "username": {"type": "string"},
                                   "avatar_url": {"type": ["string", "null"]}, "online": {"type": "boolean"},
                                   "last_seen_at": NULLABLE_TIMESTAMP}}},
                "unread_count": {"type": "integer", "minimum": 0},
                "last_message": {"oneOf": [_ref("MessageSummary"), {"type": "null"}]},
            },
        },
        "Presence": {
            "type": "object", "required": ["user_id", "online", "status", "last_seen_at", "connections"],
            "properties": {"user_id": {"type": "string"}, "online": {"type": "boolean"},
                           "status": {"type": "string", "enum": ["online", "away", "busy", "offline"]},
                           "last_seen_at": NULLABLE_TIMESTAMP, "connections": {"type": "integer", "minimum": 0}},
        },
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    }
    conversation_body = {"type": "object", "required": ["conversation"],
                         "properties": {"conversation": _ref("Conversation")}}
    message_body = {"type": "object", "required": ["message"], "properties": {"message": _ref("Message")}}
    paths: Json = {
        "/healthz": {"get": _op("Liveness: 200 while the process serves", {
            "200": _json_body(_ref("Health"), "serving")}, public=True, operation_id="healthz")},
        "/readyz": {"get": _op("Readiness: the store accepts writes and the WebSocket listener accepts", {
            "200": _json_body(_ref("Health"), "ready"),
            "503": _json_body({"type": "object", "required": ["status"],
                               "properties": {"status": {"type": "string"}, "reason": {"type": "string"}}},
                              "not ready (also during shutdown)")}, public=True, operation_id="readyz")},
        "/v1/openapi.json": {"get": _op("This document", {
            "200": _json_body({"type": "object"}, "OpenAPI 3.1")}, public=True, operation_id="openapi")},
        "/v1/conversations": {"post": _op(
            "Create a conversation (or get the open two-person one); not counted toward any daily limit",
            {"201": _json_body(conversation_body, "created; the participants' connections get conversation:created"),
             "200": _json_body(conversation_body, "the existing open two-person conversation"),
             **_errors(403, 409, 413)},
            body={"type": "object", "required": ["participant_ids"], "properties": {"participant_ids": {
                "type": "array", "minItems": 2, "maxItems": max(2, settings.max_participants),
                "items": id_schema}}},
            operation_id="createConversation")},
        "/v1/conversations/{conversation_id}": {
            "parameters": [conversation_id],
            "get": _op("A conversation, open or closed", {
                "200": _json_body({"type": "object", "required": ["conversation"],
                                   "properties": {"conversation": _ref("ConversationState")}}, "found"),
                **_errors(404)}, operation_id="getConversation"),
            "delete": _op("Close it (unmatch, reason unmatched, closed_by service); again: 204", {
                "204": {"description": "closed"}, **_errors(404)}, operation_id="closeConversation"),
        },
        "/v1/conversations/{conversation_id}/messages": {
            "parameters": [conversation_id],
            "post": _op("Post a system message (sender_id system), fanned out like a sent message", {
                "201": _json_body(message_body, "stored and sent"),
                "200": _json_body(message_body, "a repeated client_message_id: the original message"),
                **_errors(404, 413, 429)},
                body={"type": "object", "required": ["content"], "properties": {
                    "content": {"type": "string", "minLength": 1, "maxLength": settings.max_text_chars},
                    "metadata": {"type": "object"},
                    "client_message_id": id_schema,
                    "type": {"type": "string", "enum": ["system"]}}},
                operation_id="postMessage"),
            "get": _op("A page of history, as message:history", {
                "200": _json_body({"type": "object", "required": ["messages", "has_more"], "properties": {
                    "messages": {"type": "array", "items": _ref("Message")}, "has_more": {"type": "boolean"}}},
                    "the page, in ascending seq"),
                **_errors(404)},
                params=[_query_int("before_seq", "messages below this seq", 0),
                        _query_int("after_seq", "messages above this seq", 0),
                        _query_int("limit", "1-100, default 50", 1, MAX_HISTORY_LIMIT)],
                operation_id="getMessages"),
        },
        "/v1/users/{user_id}/disconnect": {
            "parameters": [user_id],
            "post": _op("Close the user's connections (disconnected, 4004); optionally revoke their tokens", {
                "200": _json_body({"type": "object", "required": ["closed_connections"], "properties": {
                    "closed_connections": {"type": "integer", "minimum": 0}}}, "asked to close"),
                **_errors(413)},
                body={"type": "object", "properties": {"revoke_tokens": {"type": "boolean"}}}, body_required=False,
                operation_id="disconnectUser"),
        },
        "/v1/users/{user_id}/presence": {
            "parameters": [user_id],
            "get": _op("The user's presence, whatever their settings", {
                "200": _json_body(_ref("Presence"), "the truth"), **_errors()}, operation_id="getPresence"),
        },
        "/v1/users/{user_id}/conversations": {
            "parameters": [user_id],
            "get": _op("The user's open conversations, as conversation:list", {
                "200": _json_body({"type": "object", "required": ["conversations"], "properties": {
                    "conversations": {"type": "array", "items": _ref("ConversationListing")}}}, "the list"),
                **_errors()}, operation_id="getUserConversations"),
        },
        "/v1/users/{user_id}/blocks": {
            "parameters": [user_id],
            "post": _op("Block a user for this user, as if they had sent user:block", {
                "201": _json_body({"type": "object", "required": ["user_id", "blocked_at"], "properties": {
                    "user_id": {"type": "string"}, "blocked_at": TIMESTAMP}}, "blocked (again: the first time)"),
                **_errors(413)},
                body={"type": "object", "required": ["user_id"], "properties": {"user_id": id_schema}},
                operation_id="blockUser"),
        },
        "/v1/users/{user_id}/blocks/{blocked_id}": {
            "parameters": [user_id, _path_param("blocked_id", "the blocked user's id")],
            "delete": _op("Unblock, as if the user had sent user:unblock", {
                "204": {"description": "not blocked (any more)"}, **_errors()}, operation_id="unblockUser"),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "winkr server API", "version": __version__,
                 "description": "The app backend's interface to winkr realtime (docs/server-api.md). Every "
                                "/v1 endpoint but this document needs Authorization: Bearer <API key>."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                                      "description": "an API key (api_keys, WINKR_API_KEYS, "
                                                                     "or `winkr api-key`)"}}},
        "security": [{"apiKey": []}],
    }
