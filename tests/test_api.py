"""The server API (contract §13) against the running server: every endpoint and status, through
the server's own ASGI app (httpx's in-memory transport into the same running server: the
same actors, a real SQLite file, MockClock), and its effects seen by WebSocket clients."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt
import orjson
import pytest
import trio
from conftest import SECRET, Client, Harness, assert_error, error_body, make_settings, refused, running, settle
from test_conversations import TS
from trio_websocket import ConnectionClosed

KEY = "test-api-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
def settings(request: Any, tmp_path: Any) -> Any:
    return make_settings(tmp_path, api_keys=[KEY, "second-key-abcdef"], **getattr(request, "param", {}))


@asynccontextmanager
async def api_client(harness: Harness, headers: dict[str, str] | None = None) -> AsyncIterator[httpx.AsyncClient]:
    assert harness.server.api_app is not None
    transport = httpx.ASGITransport(app=harness.server.api_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://winkr-api",
                                 headers=AUTH if headers is None else headers) as client:
        yield client


@pytest.fixture
async def api(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(harness) as client:
        yield client


def error(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body.keys() == {"error"} and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if field is not None:
        assert body["error"]["details"]["field"] == field, body
    return body["error"]


async def create(api: httpx.AsyncClient, *users: str) -> str:
    response = await api.post("/v1/conversations", json={"participant_ids": list(users)})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["conversation"]["id"])


async def closed_code(client: Client) -> tuple[list[dict[str, Any]], int]:
    events = []
    with trio.fail_after(30), pytest.raises(ConnectionClosed) as info:
        while True:
            events.append(orjson.loads(await client.ws.get_message()))
    return events, info.value.reason.code


# --- health, keys, the error shape ----------------------------------------------------------------

async def test_health_and_the_document_need_no_key(autojump_clock: Any, harness: Harness) -> None:
    async with api_client(harness, headers={}) as anonymous:
        assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
        ready = await anonymous.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        document = (await anonymous.get("/v1/openapi.json")).json()
        assert document["openapi"] == "3.1.0" and "/v1/conversations" in document["paths"]


async def test_readyz_is_503_during_shutdown(autojump_clock: Any, settings: Any) -> None:
    async with running(settings) as harness:
        alice = await harness.connect("alice")
        async with api_client(harness) as api:
            harness.server.request_shutdown()
            await trio.sleep(0.01)  # the server stops accepting; alice is still being said goodbye to
            response = await api.get("/readyz")
            assert response.status_code == 503
            assert response.json()["status"] == "unavailable" and response.json()["reason"]
            assert (await api.get("/healthz")).status_code == 200  # the process still serves
        del alice


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong-key"}, {"authorization": f"Basic {KEY}"},
                                     {"authorization": "Bearer "}, {"authorization": KEY}],
                         ids=["none", "wrong", "basic", "empty", "no_scheme"])
async def test_every_v1_endpoint_needs_a_key(autojump_clock: Any, harness: Harness, headers: dict[str, str]) -> None:
    async with api_client(harness, headers=headers) as anonymous:
        for method, path in (("POST", "/v1/conversations"), ("GET", "/v1/conversations/c"),
                             ("DELETE", "/v1/conversations/c"), ("POST", "/v1/conversations/c/messages"),
                             ("GET", "/v1/conversations/c/messages"), ("POST", "/v1/users/u/disconnect"),
                             ("GET", "/v1/users/u/presence"), ("GET", "/v1/users/u/conversations"),
                             ("POST", "/v1/users/u/blocks"), ("DELETE", "/v1/users/u/blocks/v")):
            response = await anonymous.request(method, path, json={})
            error(response, 401, "UNAUTHORIZED")
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_any_configured_key_is_accepted(autojump_clock: Any, harness: Harness) -> None:
    async with api_client(harness, headers={"authorization": "bearer second-key-abcdef"}) as api:
        assert (await api.get("/v1/users/alice/presence")).status_code == 200


async def test_unknown_paths_wrong_methods_and_large_bodies_answer_json(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    error(await api.get("/v1/nothing-here"), 404, "NOT_FOUND")
    error(await api.get("/"), 404, "NOT_FOUND")
    wrong = await api.put("/v1/conversations/c")
    error(wrong, 405, "VALIDATION_ERROR")
    assert set(wrong.headers["allow"].split(", ")) >= {"GET", "DELETE"}
    error(await api.get("/v1/conversations"), 405, "VALIDATION_ERROR")
    error(await api.post("/v1/conversations/", json={"participant_ids": ["a", "b"]}), 404, "NOT_FOUND")
    huge = {"participant_ids": ["a", "b"], "padding": "x" * (64 * 1024)}
    error(await api.post("/v1/conversations", json=huge), 413, "MESSAGE_TOO_LARGE")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: found while reading
        for _ in range(20):
            yield b" " * 4096

    error(await api.post("/v1/conversations", content=chunks()), 413, "MESSAGE_TOO_LARGE")
    exactly = b'{"participant_ids": ["a", "b"]}'.ljust(64 * 1024)
    assert (await api.post("/v1/conversations", content=exactly)).status_code == 201


@pytest.mark.parametrize("body, field", [(b"{not json", None), (b"[1, 2]", None), (b'"text"', None),
                                         (b"{}", "participant_ids"), (b'{"participant_ids": "bob"}', "participant_ids"),
                                         (b'{"participant_ids": ["a", 5]}', "participant_ids.1"),
                                         (b'{"participant_ids": ["a"]}', "participant_ids"),
                                         (b'{"participant_ids": ["a", "a"]}', "participant_ids")])
async def test_create_validates_its_body(autojump_clock: Any, harness: Harness, api: httpx.AsyncClient,
                                         body: bytes, field: str | None) -> None:
    error(await api.post("/v1/conversations", content=body), 400, "VALIDATION_ERROR", field)


# --- conversations --------------------------------------------------------------------------------

async def test_create_201_tells_participants_and_the_pair_again_is_200(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    created = await api.post("/v1/conversations", json={"participant_ids": ["alice", "bob"]})
    assert created.status_code == 201
    conversation = created.json()["conversation"]
    assert conversation.keys() == {"id", "participant_ids", "created_at"}
    assert (conversation["participant_ids"], conversation["created_at"]) == (["alice", "bob"], TS)
    for client in (alice, bob):
        got = await client.expect("conversation:created")
        assert got["data"] == {"conversation": conversation} and "ref" not in got
    again = await api.post("/v1/conversations", json={"participant_ids": ["bob", "alice"]})
    assert (again.status_code, again.json()) == (200, {"conversation": conversation})
    # The two now hear of each other's presence, as with conversation:create.
    await settle(alice)
    await bob.close()
    assert (await alice.expect("user:offline"))["data"]["user_id"] == "bob"


@pytest.mark.parametrize("settings", [{"limits": {"conversations_per_day": 1}, "max_participants": 3}],
                         indirect=True, ids=["1_per_day"])
async def test_create_counts_toward_no_daily_limit_and_refuses_full_and_blocked(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    for other in ("b", "c", "d"):
        assert (await api.post("/v1/conversations", json={"participant_ids": ["a", other]})).status_code == 201
    a = await harness.connect("a")
    assert (await a.request("conversation:create", {"participant_ids": ["e"]}))["event"] == "conversation:created"
    error(await api.post("/v1/conversations", json={"participant_ids": ["a", "b", "c", "d"]}), 409,
          "CONVERSATION_FULL", "participant_ids")
    await a.request("user:block", {"user_id": "f"})
    error(await api.post("/v1/conversations", json={"participant_ids": ["f", "a"]}), 403, "FORBIDDEN",
          "participant_ids")


async def test_get_conversation_open_and_closed(autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    conversation_id = await create(api, "alice", "bob")
    await api.post(f"/v1/conversations/{conversation_id}/messages", json={"content": "welcome"})
    response = await api.get(f"/v1/conversations/{conversation_id}")
    assert response.status_code == 200
    assert response.json() == {"conversation": {"id": conversation_id, "participant_ids": ["alice", "bob"],
                                                "created_at": TS, "closed_at": None, "last_seq": 1}}
    assert (await api.delete(f"/v1/conversations/{conversation_id}")).status_code == 204
    closed = (await api.get(f"/v1/conversations/{conversation_id}")).json()["conversation"]
    assert closed["closed_at"] == TS and closed["last_seq"] == 1
    error(await api.get("/v1/conversations/no-such-conversation"), 404, "NOT_FOUND", "conversation_id")
    error(await api.get("/v1/conversations/" + "x" * 65), 400, "VALIDATION_ERROR", "conversation_id")


async def test_delete_closes_as_an_unmatch_and_again_is_204(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conversation_id = await create(api, "alice", "bob")
    await settle(alice, bob)
    response = await api.delete(f"/v1/conversations/{conversation_id}")
    assert (response.status_code, response.content) == (204, b"")
    for client in (alice, bob):
        got = await client.expect("conversation:closed")
        assert got["data"] == {"conversation_id": conversation_id, "reason": "unmatched", "closed_at": TS}
        assert_error(await client.request("message:send", {"conversation_id": conversation_id, "type": "text",
                                                           "content": "hi"}),
                     "NOT_FOUND", "conversation_id", "message:send")
    assert (await api.delete(f"/v1/conversations/{conversation_id}")).status_code == 204
    assert [e for e in await alice.nothing_more() if e["event"] == "conversation:closed"] == []
    error(await api.delete("/v1/conversations/no-such-conversation"), 404, "NOT_FOUND")
    assert await create(api, "alice", "bob") != conversation_id  # never reused


async def test_delete_closes_a_group_too(autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    carol = await harness.connect("carol")
    group = await create(api, "alice", "bob", "carol")
    assert (await api.delete(f"/v1/conversations/{group}")).status_code == 204
    assert (await carol.expect("conversation:closed"))["data"]["conversation_id"] == group


# --- messages -------------------------------------------------------------------------------------

async def test_a_system_message_is_fanned_out_like_a_sent_one(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conversation_id = await create(api, "alice", "bob")
    await alice.request("conversation:join", {"conversation_id": conversation_id})
    await settle(alice, bob)
    response = await api.post(f"/v1/conversations/{conversation_id}/messages",
                              json={"content": "You matched!", "metadata": {"kind": "match"},
                                    "client_message_id": "match-1"})
    assert response.status_code == 201
    message = response.json()["message"]
    assert (message["type"], message["sender_id"], message["content"], message["seq"]) == (
        "system", "system", "You matched!", 1)
    assert message["metadata"] == {"kind": "match"} and message["client_message_id"] == "match-1"
    new = await alice.expect("message:new")  # joined: the message itself
    assert new["data"]["message"] == message and "ref" not in new
    assert new["data"]["sender"] == {"id": "system", "username": "system", "avatar_url": None}
    unread = await bob.expect("conversation:unread")  # not joined: the unread count
    assert unread["data"]["unread_count"] == 1 and unread["data"]["last_message"]["id"] == message["id"]

    again = await api.post(f"/v1/conversations/{conversation_id}/messages",
                           json={"content": "You matched!", "client_message_id": "match-1"})
    assert (again.status_code, again.json()) == (200, {"message": message})
    assert [e for e in await alice.nothing_more() + await bob.nothing_more()
            if e["event"] in ("message:new", "conversation:unread")] == []
    stored = (await api.get(f"/v1/conversations/{conversation_id}/messages")).json()
    assert [m["id"] for m in stored["messages"]] == [message["id"]]


@pytest.mark.parametrize("settings", [{"limits": {"messages_per_minute": 1, "messages_per_hour": 1,
                                                  "messages_per_day": 1}}], indirect=True, ids=["1_per_minute"])
async def test_system_messages_count_toward_no_message_limit(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    conversation_id = await create(api, "alice", "bob")
    for n in range(5):
        response = await api.post(f"/v1/conversations/{conversation_id}/messages", json={"content": f"note {n}"})
        assert response.status_code == 201, response.text


@pytest.mark.parametrize("body, status, code, field", [
    ({"content": "hi", "type": "text"}, 400, "INVALID_MESSAGE_TYPE", "type"),
    ({"content": "hi", "type": "photo"}, 400, "INVALID_MESSAGE_TYPE", "type"),
    ({"content": "hi", "type": 3}, 400, "VALIDATION_ERROR", "type"),
    ({}, 400, "VALIDATION_ERROR", "content"),
    ({"content": "   "}, 400, "VALIDATION_ERROR", "content"),
    ({"content": 5}, 400, "VALIDATION_ERROR", "content"),
    ({"content": "hi", "metadata": []}, 400, "VALIDATION_ERROR", "metadata"),
    ({"content": "hi", "client_message_id": ""}, 400, "VALIDATION_ERROR", "client_message_id"),
    ({"content": "x" * 2001}, 413, "MESSAGE_TOO_LARGE", "content"),
], ids=["text", "photo", "type_number", "no_content", "blank", "content_number", "metadata_list", "empty_cmid",
        "too_long"])
async def test_post_message_refusals(autojump_clock: Any, harness: Harness, api: httpx.AsyncClient,
                                     body: dict[str, Any], status: int, code: str, field: str) -> None:
    conversation_id = await create(api, "alice", "bob")
    error(await api.post(f"/v1/conversations/{conversation_id}/messages", json=body), status, code, field)
    assert (await api.get(f"/v1/conversations/{conversation_id}")).json()["conversation"]["last_seq"] == 0


async def test_post_message_into_a_closed_or_unknown_conversation_is_404(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    conversation_id = await create(api, "alice", "bob")
    await api.delete(f"/v1/conversations/{conversation_id}")
    for target in (conversation_id, "no-such-conversation"):
        error(await api.post(f"/v1/conversations/{target}/messages", json={"content": "hi"}), 404, "NOT_FOUND")


async def test_history_pages_like_message_history(autojump_clock: Any, harness: Harness,
                                                  api: httpx.AsyncClient) -> None:
    alice = await harness.connect("alice")
    conversation_id = await create(api, "alice", "bob")
    sent = []
    for n in range(5):
        reply = await alice.request("message:send", {"conversation_id": conversation_id, "type": "text",
                                                     "content": f"m{n}"})
        sent.append(reply["data"]["message"])
    await alice.request("message:delete", {"conversation_id": conversation_id, "message_id": sent[1]["id"]})
    url = f"/v1/conversations/{conversation_id}/messages"
    page = (await api.get(url, params={"limit": 2})).json()
    assert ([m["seq"] for m in page["messages"]], page["has_more"]) == ([4, 5], True)
    page = (await api.get(url, params={"before_seq": 4, "limit": 2})).json()
    assert [m["seq"] for m in page["messages"]] == [2, 3]
    erased = page["messages"][0]
    assert (erased["content"], erased["metadata"], erased["is_deleted"]) == ("", {}, True)
    page = (await api.get(url, params={"after_seq": 3})).json()
    assert ([m["seq"] for m in page["messages"]], page["has_more"]) == ([4, 5], False)
    for params, field in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"before_seq": "x"}, "before_seq"),
                          ({"after_seq": -1}, "after_seq"), ({"limit": "1.5"}, "limit")):
        error(await api.get(url, params=params), 400, "VALIDATION_ERROR", field)
    error(await api.get("/v1/conversations/no-such-conversation/messages"), 404, "NOT_FOUND")
    await api.delete(f"/v1/conversations/{conversation_id}")
    assert (await api.get(url)).status_code == 200  # the backend can still read a closed one (moderation)


# --- users ----------------------------------------------------------------------------------------

async def test_disconnect_closes_every_connection_with_4004(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    phone = await harness.connect("alice")
    laptop = await harness.connect("alice")
    bob = await harness.connect("bob")
    response = await api.post("/v1/users/alice/disconnect", json={})
    assert (response.status_code, response.json()) == (200, {"closed_connections": 2})
    for client in (phone, laptop):
        events, code = await closed_code(client)
        assert code == 4004
        assert events[-1]["event"] == "connection:closed"
        assert events[-1]["data"] == {"reason": "disconnected", "code": 4004, "timestamp": TS}
    assert (await bob.request("conversation:list"))["event"] == "conversation:list"  # others untouched
    again = await api.post("/v1/users/alice/disconnect")  # no body at all is fine
    assert again.json() == {"closed_connections": 0}
    assert (await harness.connect("alice")).user_id == "alice"  # without revoke_tokens the token still works
    error(await api.post("/v1/users/alice/disconnect", json={"revoke_tokens": "yes"}), 400, "VALIDATION_ERROR",
          "revoke_tokens")


async def test_revoked_tokens_are_refused_also_after_a_restart(autojump_clock: Any, settings: Any) -> None:
    async with running(settings) as harness:
        old_token = harness.token("alice")
        alice = await harness.connect("alice", token=old_token)
        await trio.sleep(5)
        async with api_client(harness) as api:
            response = await api.post("/v1/users/alice/disconnect", json={"revoke_tokens": True})
        assert response.json() == {"closed_connections": 1}
        assert (await closed_code(alice))[1] == 4004
        rejection = await _refused(harness, old_token)
        assert rejection == 401
        await trio.sleep(2)  # iat has a resolution of a second
        fresh = await harness.connect("alice")  # a token issued after the revocation works
        refresh = await fresh.request("auth:refresh", {"token": old_token})
        assert_error(refresh, "UNAUTHORIZED", None, "auth:refresh")
        assert refresh["data"]["details"] == {}  # like any other refused token
        no_iat = jwt.encode({"sub": "alice", "exp": int(harness.server.clock() + 3600)}, SECRET, algorithm="HS256")
        assert await _refused(harness, no_iat) == 401  # no iat: issued "before" any revocation
    async with running(settings) as harness:
        assert await _refused(harness, old_token) == 401
        assert (await harness.connect("alice")).user_id == "alice"
        assert (await harness.connect("bob", token=harness.token("bob"))).user_id == "bob"


async def _refused(harness: Harness, token: str) -> int:
    rejection = await refused(harness, headers=[("Authorization", f"Bearer {token}")])
    assert error_body(rejection)["data"]["code"] == "UNAUTHORIZED"
    return int(rejection.status_code)


async def test_presence_tells_the_truth_whatever_the_settings(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    nobody = (await api.get("/v1/users/nobody/presence")).json()
    assert nobody == {"user_id": "nobody", "online": False, "status": "offline", "last_seen_at": None,
                      "connections": 0}
    alice = await harness.connect("alice")
    await harness.connect("alice")
    await alice.request("user:settings", {"online_status": False})
    await alice.request("user:status", {"status": "busy"})
    truth = (await api.get("/v1/users/alice/presence")).json()
    assert truth == {"user_id": "alice", "online": True, "status": "busy", "last_seen_at": None, "connections": 2}
    bob = await harness.connect("bob")
    await bob.close()
    await trio.sleep(10)  # past the grace period: last seen is stored
    gone = (await api.get("/v1/users/bob/presence")).json()
    assert (gone["online"], gone["connections"], gone["last_seen_at"]) == (False, 0, TS)
    error(await api.get("/v1/users/%20bob/presence"), 400, "VALIDATION_ERROR", "user_id")


async def test_user_conversations_is_conversation_list_for_that_user(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    alice = await harness.connect("alice")
    with_bob = await create(api, "alice", "bob")
    with_carol = await create(api, "alice", "carol")
    await api.post(f"/v1/conversations/{with_bob}/messages", json={"content": "hello"})
    await api.delete(f"/v1/conversations/{with_carol}")
    listing = (await api.get("/v1/users/alice/conversations")).json()
    reply = await alice.request("conversation:list", {})
    assert listing == {"conversations": reply["data"]["conversations"]}
    assert [c["id"] for c in listing["conversations"]] == [with_bob]
    assert listing["conversations"][0]["unread_count"] == 1
    assert (await api.get("/v1/users/nobody/conversations")).json() == {"conversations": []}


async def test_blocks_as_if_the_user_had_sent_them(autojump_clock: Any, harness: Harness,
                                                   api: httpx.AsyncClient) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    conversation_id = await create(api, "alice", "bob")
    await settle(alice, bob)
    response = await api.post("/v1/users/alice/blocks", json={"user_id": "bob"})
    assert (response.status_code, response.json()) == (201, {"user_id": "bob", "blocked_at": TS})
    for client in (alice, bob):
        got = await client.expect("conversation:closed")
        assert got["data"]["conversation_id"] == conversation_id and got["data"]["reason"] == "unmatched"
    blocks = await alice.request("user:blocks", {})
    assert [b["user_id"] for b in blocks["data"]["blocks"]] == ["bob"]
    error(await api.post("/v1/conversations", json={"participant_ids": ["bob", "alice"]}), 403, "FORBIDDEN")
    again = await api.post("/v1/users/alice/blocks", json={"user_id": "bob"})
    assert (again.status_code, again.json()) == (201, response.json())
    error(await api.post("/v1/users/alice/blocks", json={"user_id": "alice"}), 400, "VALIDATION_ERROR", "user_id")
    error(await api.post("/v1/users/alice/blocks", json={}), 400, "VALIDATION_ERROR", "user_id")

    unblocked = await api.delete("/v1/users/alice/blocks/bob")
    assert (unblocked.status_code, unblocked.content) == (204, b"")
    assert (await alice.request("user:blocks", {}))["data"] == {"blocks": []}
    assert (await api.delete("/v1/users/alice/blocks/bob")).status_code == 204
    assert (await api.post("/v1/conversations", json={"participant_ids": ["bob", "alice"]})).status_code == 201


async def test_ids_with_a_slash_are_addressed_percent_encoded(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    await harness.connect("team/alice")
    truth = (await api.get("/v1/users/team%2Falice/presence")).json()
    assert (truth["user_id"], truth["online"]) == ("team/alice", True)
    assert (await api.post("/v1/users/team%2Falice/blocks", json={"user_id": "x/y"})).status_code == 201
    assert (await api.delete("/v1/users/team%2Falice/blocks/x%2Fy")).status_code == 204


@pytest.mark.parametrize(("method", "path", "field"), [
    ("GET", "/v1/users/%FF/presence", "user_id"),
    ("GET", "/v1/users/%ED%A0%80/conversations", "user_id"),  # a UTF-8-encoded surrogate
    ("POST", "/v1/users/al%C3ice/disconnect", "user_id"),
    ("DELETE", "/v1/users/alice/blocks/%FE", "blocked_id"),
    ("GET", "/v1/conversations/%FF", "conversation_id"),
])
async def test_path_ids_that_are_not_utf8_are_refused_not_replaced(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient, method: str, path: str, field: str) -> None:
    # Decoded with U+FFFD replacements, %FF and %FE were two more spellings of the user "\ufffd".
    error(await api.request(method, path), 400, "VALIDATION_ERROR", field)


async def test_a_user_id_that_is_u_fffd_itself_is_addressed_as_its_utf8(
        autojump_clock: Any, harness: Harness, api: httpx.AsyncClient) -> None:
    await harness.connect("\ufffd")
    truth = (await api.get("/v1/users/%EF%BF%BD/presence")).json()
    assert (truth["user_id"], truth["online"]) == ("\ufffd", True)
