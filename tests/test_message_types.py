"""Message types and content policy end to end through the server (contract §5, §11.8,
§11.12, §11.13, §11.18, §11.20): ``message:send``, its acknowledgement, what the other side
receives and what history keeps; block-list filtering, PII masking/rejection, encrypted
passthrough, ephemeral photos (also across a restart) and service accounts.

Everything runs the real server over in-memory streams under trio's MockClock (autojump).
"""
from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import (
    URL,
    Harness,
    history_messages,
    join,
    joined_pair,
    make_settings,
    running,
    send_ok,
    send_refused,
)

MiB = 1024 * 1024
OMIT = object()  # leave the key out of the request


# --- helpers ---------------------------------------------------------------------------

def send_data(conversation_id: str, type_: Any, content: Any = OMIT, metadata: Any = OMIT) -> dict[str, Any]:
    data: dict[str, Any] = {"conversation_id": conversation_id, "type": type_}
    if content is not OMIT:
        data["content"] = content
    if metadata is not OMIT:
        data["metadata"] = metadata
    return data


# --- the type table --------------------------------------------------------------------

LONG_URL = "https://cdn.winkr.test/" + "a" * (2048 - len("https://cdn.winkr.test/"))
assert len(LONG_URL) == 2048

# (id, type, content, metadata, expected code or None for accepted, details.field)
CASES: list[tuple[str, Any, Any, Any, str | None, str | None]] = [
    ("text", "text", "Hey! How are you?", {}, None, None),
    ("text_without_metadata", "text", "hi", OMIT, None, None),
    ("text_2000_chars", "text", "a" * 2000, {}, None, None),
    ("text_2000_code_points", "text", "\U0001F600" * 2000, {}, None, None),
    ("text_blank", "text", "  \n\t ", {}, "VALIDATION_ERROR", "content"),
    ("text_empty", "text", "", {}, "VALIDATION_ERROR", "content"),
    ("text_missing_content", "text", OMIT, {}, "VALIDATION_ERROR", "content"),
    ("text_content_not_a_string", "text", 42, {}, "VALIDATION_ERROR", "content"),
    ("text_2001_chars", "text", "a" * 2001, {}, "MESSAGE_TOO_LARGE", "content"),
    ("text_2001_code_points", "text", "\U0001F600" * 2001, {}, "MESSAGE_TOO_LARGE", "content"),
    ("photo", "photo", OMIT, {"url": URL}, None, None),
    ("photo_with_caption", "photo", "at the beach", {"url": URL, "size_bytes": 1234}, None, None),
    ("photo_url_2048_chars", "photo", OMIT, {"url": LONG_URL}, None, None),
    ("photo_exactly_10_mib", "photo", OMIT, {"url": URL, "size_bytes": 10 * MiB}, None, None),
    ("photo_http_url", "photo", OMIT, {"url": "http://cdn.winkr.test/p.jpg"}, "VALIDATION_ERROR", "metadata.url"),
    ("photo_no_url", "photo", OMIT, {}, "VALIDATION_ERROR", "metadata.url"),
    ("photo_no_metadata", "photo", OMIT, OMIT, "VALIDATION_ERROR", "metadata.url"),
    ("photo_url_not_a_url", "photo", OMIT, {"url": "just text"}, "VALIDATION_ERROR", "metadata.url"),
    ("photo_url_2049_chars", "photo", OMIT, {"url": LONG_URL + "a"}, "VALIDATION_ERROR", "metadata.url"),
    ("photo_over_10_mib", "photo", OMIT, {"url": URL, "size_bytes": 10 * MiB + 1},
     "MESSAGE_TOO_LARGE", "metadata.size_bytes"),
    ("photo_ephemeral", "photo_ephemeral", OMIT, {"url": URL, "ttl_seconds": 5}, None, None),
    ("photo_ephemeral_default_ttl", "photo_ephemeral", OMIT, {"url": URL}, None, None),
    ("photo_ephemeral_http_url", "photo_ephemeral", OMIT, {"url": "http://x.test/p.jpg"},
     "VALIDATION_ERROR", "metadata.url"),
    ("photo_ephemeral_over_10_mib", "photo_ephemeral", OMIT, {"url": URL, "size_bytes": 11 * MiB},
     "MESSAGE_TOO_LARGE", "metadata.size_bytes"),
    ("photo_ephemeral_ttl_61", "photo_ephemeral", OMIT, {"url": URL, "ttl_seconds": 61},
     "VALIDATION_ERROR", "metadata.ttl_seconds"),
    ("photo_ephemeral_ttl_0", "photo_ephemeral", OMIT, {"url": URL, "ttl_seconds": 0},
     "VALIDATION_ERROR", "metadata.ttl_seconds"),
    ("location", "location", OMIT, {"latitude": 48.8584, "longitude": 2.2945}, None, None),
    ("location_bounds_max", "location", "here", {"latitude": 90, "longitude": 180}, None, None),
    ("location_bounds_min", "location", OMIT, {"latitude": -90, "longitude": -180}, None, None),
    ("location_latitude_91", "location", OMIT, {"latitude": 91, "longitude": 0},
     "VALIDATION_ERROR", "metadata.latitude"),
    ("location_latitude_minus_90_5", "location", OMIT, {"latitude": -90.5, "longitude": 0},
     "VALIDATION_ERROR", "metadata.latitude"),
    ("location_longitude_181", "location", OMIT, {"latitude": 0, "longitude": 181},
     "VALIDATION_ERROR", "metadata.longitude"),
    ("location_latitude_string", "location", OMIT, {"latitude": "48.8", "longitude": 2.3},
     "VALIDATION_ERROR", "metadata.latitude"),
    ("location_longitude_missing", "location", OMIT, {"latitude": 48.8},
     "VALIDATION_ERROR", "metadata.longitude"),
    ("gift", "gift", OMIT, {"gift_id": "red-rose"}, None, None),
    ("gift_with_label", "gift", "for you", {"gift_id": "red-rose"}, None, None),
    ("gift_missing_gift_id", "gift", "for you", {}, "VALIDATION_ERROR", "metadata.gift_id"),
    ("system_from_a_user", "system", "You matched!", {}, "FORBIDDEN", None),
    ("unknown_type_video", "video", "hi", {}, "INVALID_MESSAGE_TYPE", "type"),
    ("unknown_type_uppercase_text", "TEXT", "hi", {}, "INVALID_MESSAGE_TYPE", "type"),
    ("unknown_type_empty", "", "hi", {}, "INVALID_MESSAGE_TYPE", "type"),
    ("type_missing", OMIT, "hi", {}, "VALIDATION_ERROR", "type"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_message_type_table(autojump_clock: Any, harness: Harness, case: tuple[Any, ...]) -> None:
    _, type_, content, metadata, code, field = case
    alice, bob, conv = await joined_pair(harness)
    data = send_data(conv, type_, content, metadata)
    data.pop("conversation_id")
    if type_ is OMIT:
        data.pop("type")
    if code is not None:
        await send_refused(alice, bob, conv, data, code, field)
        return
    message = await send_ok(alice, bob, conv, data)
    assert message["type"] == type_
    assert message["sender_id"] == "alice"
    if content is not OMIT:
        assert message["content"] == content
    given = {} if metadata is OMIT else metadata
    for key, value in given.items():
        assert message["metadata"][key] == value, message
    assert "filtered" not in message["metadata"] and "pii_masked" not in message["metadata"], message
    if type_ == "photo_ephemeral":
        assert message["metadata"]["ttl_seconds"] == given.get("ttl_seconds", 10)
    assert [m["id"] for m in await history_messages(bob, conv)] == [message["id"]]


async def test_system_message_from_a_service_token_is_accepted(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    service = await harness.connect("matchmaker", service=True)
    ref = await service.send("message:send", {"conversation_id": conv, "type": "system",
                                              "content": "You matched!", "metadata": {}})
    ack = await service.expect("message:new", ref=ref)
    message = ack["data"]["message"]
    assert (message["type"], message["content"], message["sender_id"]) == ("system", "You matched!", "matchmaker")
    for client in (alice, bob):
        got = await client.expect("message:new")
        assert got["data"]["message"] == message


async def test_system_message_from_a_service_token_still_needs_content(autojump_clock: Any,
                                                                       harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    service = await harness.connect("matchmaker", service=True)
    await send_refused(service, bob, conv, {"type": "system", "content": "  ", "metadata": {}},
                       "VALIDATION_ERROR", "content")


# --- content filtering -----------------------------------------------------------------

@pytest.mark.parametrize("content,expected", [
    ("this is shit", "this is ****"),
    ("What the FUCK, man", "What the ****, man"),
    ("shit happens, shit", "**** happens, ****"),
])
async def test_blocked_words_are_masked_and_flagged(autojump_clock: Any, harness: Harness,
                                                    content: str, expected: str) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_ok(alice, bob, conv, {"type": "text", "content": content, "metadata": {}})
    assert message["content"] == expected
    assert message["metadata"].get("filtered") is True, message
    stored = (await history_messages(bob, conv))[0]
    assert stored["content"] == expected and stored["metadata"].get("filtered") is True


async def test_clean_text_is_not_flagged(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_ok(alice, bob, conv, {"type": "text", "content": "a classy Scunthorpe assessment",
                                               "metadata": {}})
    assert message["content"] == "a classy Scunthorpe assessment"
    assert "filtered" not in message["metadata"]


async def test_photo_caption_is_filtered_too(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_ok(alice, bob, conv, {"type": "photo", "content": "shit view",
                                               "metadata": {"url": URL}})
    assert message["content"] == "**** view"
    assert message["metadata"].get("filtered") is True


@pytest.mark.parametrize("settings", [{"blocked_words": ("pineapple",)}], indirect=True)
async def test_the_block_list_is_a_setting_that_replaces_the_default(autojump_clock: Any,
                                                                     harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_ok(alice, bob, conv, {"type": "text", "content": "pineapple on shit pizza",
                                               "metadata": {}})
    assert message["content"] == "********* on shit pizza"
    assert message["metadata"].get("filtered") is True


# --- PII -------------------------------------------------------------------------------

PII_TEXTS = {
    "email": ("mail me at jane.doe@example.com tonight", "jane.doe@example.com"),
    "phone": ("call me on +1 415 555 2671 later", "+1 415 555 2671"),
    "card": ("my card is 4111 1111 1111 1111 ok", "4111 1111 1111 1111"),
}


@pytest.mark.parametrize("kind", sorted(PII_TEXTS))
async def test_pii_is_masked_by_default(autojump_clock: Any, harness: Harness, kind: str) -> None:
    content, pii = PII_TEXTS[kind]
    alice, bob, conv = await joined_pair(harness)
    message = await send_ok(alice, bob, conv, {"type": "text", "content": content, "metadata": {}})
    masked = message["content"]
    assert message["metadata"].get("pii_masked") is True, message
    assert len(masked) == len(content), masked
    start = content.index(pii)
    assert masked[start:start + len(pii)].strip("* ") == "", masked  # every character of it masked
    assert "*" in masked
    # What is not PII stays as it was.
    prefix = content[:content.index(pii)]
    suffix = content[content.index(pii) + len(pii):]
    assert masked.startswith(prefix) and masked.endswith(suffix), masked
    stored = (await history_messages(bob, conv))[0]
    assert stored["content"] == masked and stored["metadata"].get("pii_masked") is True


async def test_email_is_masked_with_stars_of_the_same_length(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_ok(alice, bob, conv, {"type": "text", "content": "write to jane.doe@example.com",
                                               "metadata": {}})
    assert message["content"] == "write to " + "*" * len("jane.doe@example.com")
    assert message["metadata"] == {"pii_masked": True}


async def test_text_without_pii_is_not_flagged(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    content = "see you at 7:30 on the 12th, table for 2"
    message = await send_ok(alice, bob, conv, {"type": "text", "content": content, "metadata": {}})
    assert message["content"] == content
    assert "pii_masked" not in message["metadata"]


@pytest.mark.parametrize("settings", [{"pii_policy": "reject"}], indirect=True)
@pytest.mark.parametrize("kind", sorted(PII_TEXTS))
async def test_pii_policy_reject_refuses_the_message(autojump_clock: Any, harness: Harness, kind: str) -> None:
    alice, bob, conv = await joined_pair(harness)
    await send_refused(alice, bob, conv, {"type": "text", "content": PII_TEXTS[kind][0], "metadata": {}},
                       "VALIDATION_ERROR", "content")
    await send_ok(alice, bob, conv, {"type": "text", "content": "no secrets here", "metadata": {}})


@pytest.mark.parametrize("settings", [{"pii_policy": "allow"}], indirect=True)
async def test_pii_policy_allow_relays_it_untouched(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    content = PII_TEXTS["email"][0]
    message = await send_ok(alice, bob, conv, {"type": "text", "content": content, "metadata": {}})
    assert message["content"] == content
    assert "pii_masked" not in message["metadata"]


# --- encrypted passthrough -------------------------------------------------------------

CIPHER_NOISE = "shit jane.doe@example.com +1 415 555 2671 4111 1111 1111 1111 \u00e9\u4e2d\U0001F600 "


def ciphertext(length: int) -> str:
    return (CIPHER_NOISE * (length // len(CIPHER_NOISE) + 1))[:length]


@pytest.mark.parametrize("length", [len(CIPHER_NOISE), 2001, 8000])
async def test_encrypted_content_is_relayed_byte_identical(autojump_clock: Any, harness: Harness,
                                                           length: int) -> None:
    alice, bob, conv = await joined_pair(harness)
    content = ciphertext(length)
    assert len(content) == length
    message = await send_ok(alice, bob, conv, {"type": "text", "content": content,
                                               "metadata": {"encrypted": True}})
    assert message["content"] == content
    assert message["metadata"] == {"encrypted": True}
    stored = (await history_messages(bob, conv))[0]
    assert stored["content"] == content
    assert stored["metadata"] == {"encrypted": True}


@pytest.mark.parametrize("settings", [{"pii_policy": "reject"}], indirect=True)
async def test_encrypted_content_skips_pii_rejection(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    content = ciphertext(500)
    message = await send_ok(alice, bob, conv, {"type": "text", "content": content,
                                               "metadata": {"encrypted": True}})
    assert message["content"] == content


async def test_encrypted_content_over_8000_is_too_large(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    await send_refused(alice, bob, conv, {"type": "text", "content": ciphertext(8001),
                                          "metadata": {"encrypted": True}}, "MESSAGE_TOO_LARGE", "content")


# --- photo_ephemeral -----------------------------------------------------------------------

def assert_erased(message: dict[str, Any]) -> None:
    """§11.8: an erased message keeps a tombstone only."""
    assert message["content"] == "", message
    assert message["metadata"] == {}, message
    assert message["is_deleted"] is True, message


def assert_system_deleted(event: dict[str, Any], message: dict[str, Any]) -> None:
    assert event["event"] == "message:deleted", event
    assert "ref" not in event, event
    assert event["data"]["message_id"] == message["id"], event
    assert event["data"]["conversation_id"] == message["conversation_id"], event
    assert event["data"]["deleted_by"] == "system", event
    assert isinstance(event["data"]["deleted_at"], str), event


async def test_ephemeral_photo_is_erased_ttl_seconds_after_the_recipient_reads_it(
        autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    laptop = await harness.connect("alice")
    await join(laptop, conv)
    await laptop.nothing_more(0.1)
    message = await send_ok(alice, bob, conv, {"type": "photo_ephemeral", "content": "peek",
                                               "metadata": {"url": URL, "ttl_seconds": 5}})
    await laptop.expect("message:new")

    # Unread, it stays (here: two minutes).
    for client in (alice, bob, laptop):
        assert [e for e in await client.nothing_more(40) if e["event"] == "message:deleted"] == []
    assert (await history_messages(bob, conv))[0]["content"] == "peek"

    reply = await bob.request("message:read", {"conversation_id": conv, "message_id": message["id"]})
    assert reply["event"] == "message:viewed", reply
    read_at = trio.current_time()
    early = await bob.nothing_more(4.9)
    assert [e for e in early if e["event"] == "message:deleted"] == []

    deleted = {}
    for name, client in (("bob", bob), ("alice", alice), ("laptop", laptop)):
        deleted[name] = await client.expect("message:deleted")
        assert_system_deleted(deleted[name], message)
        if name == "bob":
            assert 5.0 - 1e-6 <= trio.current_time() - read_at <= 5.1, trio.current_time() - read_at
    for client in (alice, bob):
        stored = (await history_messages(client, conv))[0]
        assert stored["id"] == message["id"]
        assert_erased(stored)
    reply = await alice.request("message:delete", {"conversation_id": conv, "message_id": message["id"]})
    assert reply["event"] == "error" and reply["data"]["code"] == "NOT_FOUND", reply


async def test_ephemeral_photo_default_ttl_is_10_seconds(autojump_clock: Any, harness: Harness) -> None:
    alice, bob, conv = await joined_pair(harness)
    message = await send_ok(alice, bob, conv, {"type": "photo_ephemeral", "metadata": {"url": URL}})
    reply = await bob.request("message:read", {"conversation_id": conv, "message_id": message["id"]})
    assert reply["event"] == "message:viewed", reply
    read_at = trio.current_time()
    assert [e for e in await bob.nothing_more(9.9) if e["event"] == "message:deleted"] == []
    assert_system_deleted(await bob.expect("message:deleted"), message)
    assert 10.0 - 1e-6 <= trio.current_time() - read_at <= 10.1


async def test_ephemeral_photo_deadline_survives_a_restart(autojump_clock: Any, tmp_path: Any, engine: Any,
                                                           watchdog: dict[str, Any]) -> None:
    settings = make_settings(tmp_path)
    async with running(settings, watchdog) as first:
        alice, bob, conv = await joined_pair(first)
        message = await send_ok(alice, bob, conv, {"type": "photo_ephemeral",
                                                   "metadata": {"url": URL, "ttl_seconds": 30}})
        reply = await bob.request("message:read", {"conversation_id": conv, "message_id": message["id"]})
        assert reply["event"] == "message:viewed", reply
        read_at = trio.current_time()
        await trio.sleep(5)
    await trio.sleep(5)  # down for a while, well before the deadline

    async with running(settings, watchdog) as second:
        alice = await second.connect("alice")
        bob = await second.connect("bob")
        await join(alice, conv)
        await join(bob, conv)
        assert (await history_messages(bob, conv))[0]["is_deleted"] is False
        before = max(0.0, read_at + 29.9 - trio.current_time())
        assert [e for e in await bob.nothing_more(before) if e["event"] == "message:deleted"] == []
        assert_system_deleted(await bob.expect("message:deleted"), message)
        assert 30.0 - 1e-6 <= trio.current_time() - read_at <= 30.1, trio.current_time() - read_at
        assert_system_deleted(await alice.expect("message:deleted"), message)
        assert_erased((await history_messages(alice, conv))[0])


async def test_ephemeral_photo_whose_deadline_passed_while_down_is_erased_at_start(
        autojump_clock: Any, tmp_path: Any, engine: Any, watchdog: dict[str, Any]) -> None:
    settings = make_settings(tmp_path)
    async with running(settings, watchdog) as first:
        alice, bob, conv = await joined_pair(first)
        message = await send_ok(alice, bob, conv, {"type": "photo_ephemeral",
                                                   "metadata": {"url": URL, "ttl_seconds": 3}})
        reply = await bob.request("message:read", {"conversation_id": conv, "message_id": message["id"]})
        assert reply["event"] == "message:viewed", reply
    await trio.sleep(60)

    async with running(settings, watchdog) as second:
        bob = await second.connect("bob")
        assert_erased((await history_messages(bob, conv))[0])


# --- service accounts ------------------------------------------------------------------

async def test_service_creates_a_conversation_for_two_users_and_posts_into_it(
        autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    service = await harness.connect("matchmaker", service=True)

    reply = await service.request("conversation:create", {"participant_ids": ["alice", "bob"]})
    assert reply["event"] == "conversation:created", reply
    conversation = reply["data"]["conversation"]
    assert sorted(conversation["participant_ids"]) == ["alice", "bob"]  # the service is not one
    conv = conversation["id"]
    for client in (alice, bob):
        told = await client.expect("conversation:created")
        assert told["data"]["conversation"]["id"] == conv

    await join(alice, conv)  # bob stays out of the room: he gets conversation:unread
    ref = await service.send("message:send", {"conversation_id": conv, "type": "system",
                                              "content": "You matched! Say hi.", "metadata": {}})
    ack = await service.expect("message:new", ref=ref)
    message = ack["data"]["message"]
    assert message["type"] == "system" and message["sender_id"] == "matchmaker"

    got = await alice.expect("message:new")
    assert got["data"]["message"] == message
    unread = await bob.expect("conversation:unread", where=lambda e: e["data"]["conversation_id"] == conv)
    assert unread["data"]["unread_count"] == 1
    assert unread["data"]["last_message"]["content"] == "You matched! Say hi."

    listed = (await service.request("conversation:list"))["data"]["conversations"]
    assert conv not in [c["id"] for c in listed]
    assert [m["id"] for m in await history_messages(bob, conv)] == [message["id"]]
