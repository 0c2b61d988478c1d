"""Property tests (hypothesis): arbitrary frames sent to one live connection never crash the
connection or the server (contract §3, §11.10).

Arbitrary JSON values, envelopes with event names from the real list and junk, data dicts
with wrong types, huge numbers, deep nesting, odd unicode, binary frames and non-JSON text.
Every frame that gets a reply gets either the request's success event or an ``error`` whose
code is one of the seed's codes (``INTERNAL_ERROR`` excluded: it means a handler crashed),
the ``ref`` is echoed, and after every example ``conversation:list`` is still answered.

Why hypothesis runs in a worker thread: pytest-trio runs every example of an ``@given``
async test in a trio.run of its own, fixtures included — one server per *example*. Here one
async test owns one server (MockClock, in-memory streams, real SQLite) and one connection,
and drives a ``@given`` function in a worker thread whose examples run back on the trio
thread through ``trio.from_thread.run``. The mock clock is frozen (no autojump) while
hypothesis generates, and autojumps while an example runs, so no real time is waited.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import trio
from conftest import (
    MAX_FRAME,
    RATE_LIMITS_OFF,
    TIMESTAMP,
    Client,
    history,
    join,
    make_settings,
    running,
    still_works,
)
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

SETTLE = 0.05  # mock seconds after each frame: the server has gone idle before they pass

SEED_CODES = {"VALIDATION_ERROR", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", "RATE_LIMITED",
              "INTERNAL_ERROR", "CONNECTION_ERROR", "MESSAGE_TOO_LARGE", "INVALID_MESSAGE_TYPE",
              "CONVERSATION_FULL"}
ACCEPTABLE_CODES = SEED_CODES - {"INTERNAL_ERROR"}

SUCCESS = {
    "message:send": "message:new",
    "message:read": "message:viewed",
    "message:delete": "message:deleted",
    "message:history": "message:history",
    "conversation:join": "conversation:joined",
    "conversation:leave": "conversation:left",
    "conversation:create": "conversation:created",
    "conversation:list": "conversation:list",
    "user:status": "user:status_updated",
    "auth:refresh": "auth:refreshed",
}
TYPING = ("typing:start", "typing:stop")  # no success reply (§11.4)
CLIENT_EVENTS = sorted(SUCCESS) + list(TYPING)
SERVER_EVENTS = {*SUCCESS.values(), "error", "connection:established", "message:delivered",
                 "typing:indicator", "user:online", "user:offline", "conversation:unread"}
FIELDS = ["conversation_id", "content", "type", "metadata", "client_message_id", "message_id",
          "before_seq", "after_seq", "limit", "participant_ids", "status", "token"]
META_FIELDS = ["url", "size_bytes", "ttl_seconds", "latitude", "longitude", "gift_id", "encrypted",
               "filtered", "pii_masked"]


# --- strategies ------------------------------------------------------------------------------

UNIQUE_REF = object()  # replaced with a fresh ref when the frame is sent
ABSENT = object()  # leave the key out

ODD_STRINGS = ["", " ", "\u0000", "\u202eevil", "\ufeff", "\U0001F600" * 5, "a\u0301\u0301\u0301",
               "\uffff", "\U0010ffff", "\U0001D573\U0001D58A", "<script>alert(1)</script>",
               "' OR 1=1 --", "../../etc/passwd", "%s%n%x", "\r\n\t", "null", "true", "{}", "[]",
               "x" * 64, "x" * 65, "\u00e9" * 70]
odd_text = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(ODD_STRINGS),
)
huge_numbers = st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30), 10**400,
                                1e308, -1e308, 5e-324, 1e999, float("nan")])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), huge_numbers,
                    st.floats(allow_nan=True, allow_infinity=True), odd_text)
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                     st.dictionaries(odd_text, inner, max_size=4)),
    max_leaves=12)


def frame_strategy(conversation_id: str) -> st.SearchStrategy[Any]:
    """Frames as ``("text", str)``, ``("bytes", bytes)`` or ``("json", object, ensure_ascii)``
    (serialised when sent, so that UNIQUE_REF can be filled in)."""
    ids = st.one_of(st.sampled_from([conversation_id, "no-such-conversation", "", "x" * 64, "x" * 65,
                                     f"{conversation_id}.1", f"{conversation_id}.999999999999999999999",
                                     f"{conversation_id}.-1", f"{conversation_id}.", "."]),
                    odd_text, json_values)
    message_types = st.one_of(st.sampled_from(["text", "photo", "photo_ephemeral", "location", "gift",
                                               "system", "video", "TEXT", ""]), json_values)
    metadata = st.one_of(
        st.dictionaries(st.sampled_from(META_FIELDS), st.one_of(
            scalars, st.sampled_from(["https://cdn.winkr.test/p.jpg", "http://x.test/p.jpg",
                                      "https://", "https://[::1", "javascript:alert(1)"]),
        ), max_size=5),
        json_values)
    field_values: dict[str, st.SearchStrategy[Any]] = {
        "conversation_id": ids, "message_id": ids, "client_message_id": ids,
        "content": st.one_of(odd_text, json_values, st.text(max_size=2100)),
        "type": message_types, "metadata": metadata,
        "before_seq": st.one_of(st.integers(-5, 10), huge_numbers, json_values),
        "after_seq": st.one_of(st.integers(-5, 10), huge_numbers, json_values),
        "limit": st.one_of(st.integers(-5, 150), huge_numbers, json_values),
        "participant_ids": st.one_of(st.lists(ids, max_size=12), json_values),
        "status": st.one_of(st.sampled_from(["online", "away", "busy", "offline", "ONLINE", "invisible"]),
                            json_values),
        "token": st.one_of(odd_text, json_values, st.just("a.b.c"),
                           st.just("eyJhbGciOiJub25lIn0.eyJzdWIiOiJmdXp6ZXIifQ.")),
    }
    data = st.one_of(
        st.fixed_dictionaries({}, optional={k: v for k, v in field_values.items()}),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), odd_text), json_values, max_size=5),
        json_values,  # not an object at all, mostly
        st.just(ABSENT),
    )
    events = st.one_of(
        st.sampled_from(CLIENT_EVENTS),
        st.sampled_from(CLIENT_EVENTS),  # twice: real events are the interesting ones
        st.sampled_from(sorted(SERVER_EVENTS) + ["connection:closed", "MESSAGE:SEND", "message:send ",
                                                 "message:", ":", "__proto__", "constructor",
                                                 "message:send\u0000", "conversation:list\n"]),
        odd_text, json_values, st.just(ABSENT))
    refs = st.one_of(st.just(UNIQUE_REF), st.just(UNIQUE_REF), st.just(ABSENT), st.none(),
                     odd_text, json_values, st.text(min_size=65, max_size=80))

    @st.composite
    def envelopes(draw: Any) -> Any:
        envelope: dict[str, Any] = {}
        for key, strategy in (("event", events), ("data", data), ("ref", refs)):
            value = draw(strategy)
            if value is not ABSENT:
                envelope[key] = value
        for key, value in draw(st.dictionaries(st.sampled_from(["timestamp", "id", "extra"]), json_values,
                                               max_size=2)).items():
            envelope[key] = value
        return ("json", envelope, draw(st.booleans()))

    @st.composite
    def deep(draw: Any) -> Any:
        depth = draw(st.integers(1, 3000))
        inner = draw(st.sampled_from(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth]))
        event = draw(st.sampled_from(CLIENT_EVENTS))
        where = draw(st.sampled_from(["data", "metadata", "top"]))
        if where == "top":
            return ("text", inner)
        if where == "metadata":
            return ("text", f'{{"event":"{event}","ref":"deep","data":{{"conversation_id":'
                            f'"{conversation_id}","type":"text","content":"x","metadata":{inner}}}}}')
        return ("text", f'{{"event":"{event}","ref":"deep","data":{inner}}}')

    raw_texts = st.sampled_from([
        '{"event":"conversation:list","data":{},"ref":"a","ref":"b"}',
        '{"event":"conversation:list","data":{"x":"\\ud800"},"ref":"lone"}',
        '{"event":"message:history","data":{"conversation_id":"c","limit":1e999},"ref":"inf"}',
        '{"event":"message:history","data":{"conversation_id":"c","limit":' + "9" * 500 + '},"ref":"big"}',
        '{"event":"conversation:list","data":{}} trailing',
        '\ufeff{"event":"conversation:list","data":{}}',
        '{"event":"conversation:list","data":{},}',
        "NaN", "Infinity", "-0", "1e999", "[]", "{}", '""', "\u0000", " ", "{", "}", "\"",
    ])
    return st.one_of(
        envelopes(), envelopes(), envelopes(),
        json_values.map(lambda v: ("json", v, True)),
        st.binary(max_size=64).map(lambda b: ("bytes", b)),
        odd_text.map(lambda t: ("text", t)),
        deep(),
        raw_texts.map(lambda t: ("text", t)),
    )


def well_formed_strategy(conversation_id: str) -> st.SearchStrategy[Any]:
    """Envelopes of real events with a good ref and data of the right shape but random
    values: the requests that get past the envelope and into the handlers and the store."""
    url = st.sampled_from(["https://cdn.winkr.test/p.jpg", "http://x.test/p.jpg", "https://" + "a" * 2050])
    metadata = st.fixed_dictionaries({}, optional={
        "url": url, "size_bytes": st.one_of(st.integers(-1, 11 * 1024 * 1024), huge_numbers),
        "ttl_seconds": st.one_of(st.integers(-1, 61), scalars),
        "latitude": st.one_of(st.floats(-100, 100), scalars), "longitude": st.one_of(st.floats(-200, 200), scalars),
        "gift_id": st.one_of(odd_text, st.integers()), "encrypted": st.one_of(st.booleans(), scalars),
        "filtered": scalars, "pii_masked": scalars, "extra": json_values,
    })
    conv = st.sampled_from([conversation_id, conversation_id, "no-such-conversation"])
    message_id = st.one_of(st.integers(0, 40).map(lambda n: f"{conversation_id}.{n}"), odd_text)
    content = st.one_of(
        odd_text, st.text(max_size=300),
        st.sampled_from(["shit happens", "mail jane.doe@example.com", "call +1 415 555 2671",
                         "card 4111 1111 1111 1111", "a" * 2000, "a" * 2001, "b" * 8001]))
    requests = st.one_of(
        st.tuples(st.just("message:send"), st.fixed_dictionaries(
            {"conversation_id": conv, "type": st.sampled_from(["text", "photo", "photo_ephemeral", "location",
                                                               "gift", "system", "sticker"])},
            optional={"content": content, "metadata": metadata,
                      "client_message_id": st.sampled_from(["c1", "c2", "c3"])})),
        st.tuples(st.sampled_from(["message:read", "message:delete"]),
                  st.fixed_dictionaries({"conversation_id": conv, "message_id": message_id})),
        st.tuples(st.just("message:history"), st.fixed_dictionaries(
            {"conversation_id": conv},
            optional={"before_seq": st.integers(-1, 50), "after_seq": st.integers(-1, 50),
                      "limit": st.integers(-1, 101)})),
        st.tuples(st.sampled_from(["conversation:join", "conversation:leave", "typing:start", "typing:stop"]),
                  st.fixed_dictionaries({"conversation_id": conv})),
        st.tuples(st.just("conversation:create"), st.fixed_dictionaries({"participant_ids": st.lists(
            st.sampled_from(["fuzzer", "peer", "other", "x" * 64, "y" * 65, ""]), max_size=12)})),
        st.tuples(st.just("conversation:list"), st.just({})),
        st.tuples(st.just("user:status"), st.fixed_dictionaries(
            {"status": st.sampled_from(["online", "away", "busy", "offline", "gone"])})),
        st.tuples(st.just("auth:refresh"), st.fixed_dictionaries({"token": odd_text})),
    )
    return requests.map(lambda r: ("json", {"event": r[0], "data": r[1], "ref": UNIQUE_REF}, False))


# --- what a frame must get back -------------------------------------------------------------

def serialise(frame: Any, next_ref: Callable[[], str]) -> str | bytes:
    kind = frame[0]
    if kind == "bytes":
        return frame[1]
    if kind == "text":
        return frame[1]
    value = frame[1]
    if isinstance(value, dict) and value.get("ref") is UNIQUE_REF:
        value = {**value, "ref": next_ref()}
    return json.dumps(value, ensure_ascii=frame[2])


def expectation(frame: str | bytes) -> tuple[str, Any, Any]:
    """``(kind, ref, event)`` as the contract reads the frame (orjson, as strict as the
    server: no NaN, no lone surrogates, depth limit)."""
    if isinstance(frame, bytes):
        return "unreadable", None, None
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return _unpaired_surrogate_expectation(frame)
    if not isinstance(obj, dict):
        return "unreadable", None, None
    ref, event, data = obj.get("ref"), obj.get("event"), obj.get("data")
    if ref is not None and not (isinstance(ref, str) and len(ref) <= 64):
        return "bad_ref", None, None
    if not isinstance(event, str) or not event:
        return "no_event", ref, None
    if data is not None and not isinstance(data, dict):
        return "bad_data", ref, event
    if event not in SUCCESS and event not in TYPING:
        return "unknown_event", ref, event
    return "request", ref, event


def _clean(value: Any, max_chars: int = 10**9) -> Any:
    if isinstance(value, str) and len(value) <= max_chars and not any("\ud800" <= c <= "\udfff" for c in value):
        return value
    return None


def _unpaired_surrogate_expectation(frame: str) -> tuple[str, Any, Any]:
    """JSON that only orjson refuses (it spells an unpaired surrogate): the server reads it
    with the standard library to name the field, echoing a clean ``ref`` and event."""
    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        obj = json.loads(frame, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return "unreadable", None, None
    if not isinstance(obj, dict):
        return "unreadable", None, None
    return "surrogate", _clean(obj.get("ref"), 64), _clean(obj.get("event"))


def check_event(event: dict[str, Any], frame: Any) -> None:
    """A well-formed server event; an error carries an acceptable code."""
    assert isinstance(event, dict), (event, frame)
    assert set(event) <= {"event", "data", "timestamp", "ref"}, (event, frame)
    assert isinstance(event.get("timestamp"), str) and TIMESTAMP.match(event["timestamp"]), (event, frame)
    assert isinstance(event.get("data"), dict), (event, frame)
    name = event.get("event")
    assert name != "connection:closed", ("the server closed the connection", event, frame)
    assert name in SERVER_EVENTS, (event, frame)
    if name == "error":
        data = event["data"]
        assert data.get("code") in ACCEPTABLE_CODES, (event, frame)
        assert isinstance(data.get("message"), str), (event, frame)
        assert data.get("request_event") is None or isinstance(data["request_event"], str), (event, frame)
        assert isinstance(data.get("details", {}), dict), (event, frame)


def check_replies(frame: str | bytes, events: list[dict[str, Any]]) -> None:
    for event in events:
        check_event(event, frame)
    kind, ref, request_event = expectation(frame)
    if ref is not None:
        replies = [e for e in events if e.get("ref") == ref]
    else:  # one connection, no other user online: everything it gets is a reply
        replies = [e for e in events if e.get("ref") is None]
    errors = [e for e in replies if e["event"] == "error"]
    context = (kind, frame if len(frame) < 400 else frame[:400], events)

    if kind == "bad_ref":
        assert any(e["event"] == "error" and e["data"]["code"] == "VALIDATION_ERROR" for e in events), context
        return
    if kind == "request" and request_event in TYPING:
        assert replies == errors and len(errors) <= 1, context
        for error in errors:
            assert error["data"]["request_event"] == request_event, context
        return
    assert len(replies) == 1, context
    reply = replies[0]
    if ref is not None:
        assert reply["ref"] == ref, context
    if kind == "request":
        if reply["event"] == "error":
            assert reply["data"]["request_event"] == request_event, context
        else:
            assert reply["event"] == SUCCESS[request_event], context
        return
    assert reply["event"] == "error" and reply["data"]["code"] == "VALIDATION_ERROR", context
    if kind in ("unreadable", "no_event"):
        assert reply["data"]["request_event"] is None, context
    else:
        assert reply["data"]["request_event"] == request_event, context
    if kind == "unknown_event":
        assert reply["data"]["details"]["field"] == "event", context


# --- the driver -----------------------------------------------------------------------------

async def fuzz_one_connection(client: Client, frames: st.SearchStrategy[Any], max_examples: int) -> int:
    """Run ``max_examples`` hypothesis examples (lists of frames) against ``client``; return
    how many frames were sent."""
    token = trio.lowlevel.current_trio_token()
    clock = trio.lowlevel.current_clock()
    counter = {"refs": 0, "frames": 0}

    def next_ref() -> str:
        counter["refs"] += 1
        return f"fz-{counter['refs']}"

    async def example(batch: list[Any]) -> None:
        clock.autojump_threshold = 0  # type: ignore[attr-defined]
        try:
            for item in batch:
                frame = serialise(item, next_ref)
                size = len(frame) if isinstance(frame, bytes) else len(frame.encode())
                if size > MAX_FRAME:
                    continue  # an oversized frame closes the connection by design (§3)
                await client.send_raw(frame)
                counter["frames"] += 1
                check_replies(frame, await client.nothing_more(SETTLE))
            await still_works(client)
        finally:
            clock.autojump_threshold = math.inf  # type: ignore[attr-defined]

    @hsettings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.large_base_example])
    @given(st.lists(frames, min_size=1, max_size=5))
    def prop(batch: list[Any]) -> None:
        trio.from_thread.run(example, batch, trio_token=token)

    clock.autojump_threshold = math.inf  # type: ignore[attr-defined]
    try:
        await trio.to_thread.run_sync(prop)
    finally:
        clock.autojump_threshold = 0  # type: ignore[attr-defined]
    return counter["frames"]


def assert_nothing_crashed(caplog: Any) -> None:
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert crashes == [], [f"{r.name}: {r.getMessage()}" for r in crashes]


async def run_fuzz(tmp_path: Any, watchdog: dict[str, Any], caplog: Any, limits: dict[str, int],
                   make_frames: Callable[[str], st.SearchStrategy[Any]], max_examples: int) -> None:
    caplog.set_level(logging.ERROR)
    async with running(make_settings(tmp_path, limits=limits), watchdog) as harness:
        fuzzer = await harness.connect("fuzzer", token=harness.token("fuzzer", ttl=10**7))
        conv = await harness.conversation(fuzzer, "peer")
        await fuzzer.nothing_more(0.1)

        sent = await fuzz_one_connection(fuzzer, make_frames(conv), max_examples)
        assert sent >= max_examples

        # The connection and the server are both still serving.
        await still_works(fuzzer)
        await still_works(await harness.connect("witness"))
    assert_nothing_crashed(caplog)


# --- the properties -------------------------------------------------------------------------


async def test_arbitrary_frames_never_break_the_connection(autojump_clock: Any, tmp_path: Any, engine: Any,
                                                           watchdog: dict[str, Any], caplog: Any) -> None:
    """Default limits: rate limiting is part of what the frames run into — all but the inbound
    budget, which pauses reading after a refusal (tests/test_abuse.py covers it), while this
    property expects every frame's reply within SETTLE."""
    await run_fuzz(tmp_path, watchdog, caplog, {"inbound_events_per_second": 0}, frame_strategy,
                   max_examples=200)


async def test_arbitrary_frames_with_limits_off_never_break_the_connection(
        autojump_clock: Any, tmp_path: Any, engine: Any, watchdog: dict[str, Any], caplog: Any) -> None:
    """Limits off, so that every frame reaches the handlers (none is merely rate limited)."""
    await run_fuzz(tmp_path, watchdog, caplog, RATE_LIMITS_OFF, frame_strategy, max_examples=150)


async def test_well_formed_requests_with_random_values_get_success_or_a_seed_error(
        autojump_clock: Any, tmp_path: Any, watchdog: dict[str, Any], caplog: Any) -> None:
    await run_fuzz(tmp_path, watchdog, caplog, RATE_LIMITS_OFF, well_formed_strategy, max_examples=200)


# --- found by the properties above, kept as plain regression tests ------------------------------

@pytest.mark.parametrize("depth", [1, 10, 100, 250, 300, 1000])
@pytest.mark.parametrize("shape", ["list", "object"])
async def test_deeply_nested_metadata_is_relayed_or_refused_never_an_internal_error(
        autojump_clock: Any, tmp_path: Any, engine: Any, watchdog: dict[str, Any], caplog: Any, depth: int,
        shape: str) -> None:
    """A ~1-6 KB frame whose metadata nests ``depth`` levels (orjson reads up to 1024 but
    writes only ~254): once made the room fail on its fan-out and took the server down."""
    caplog.set_level(logging.ERROR)
    nested = "[" * depth + "]" * depth if shape == "list" else '{"a":' * depth + "1" + "}" * depth
    async with running(make_settings(tmp_path), watchdog) as harness:
        alice = await harness.connect("alice")
        bob = await harness.connect("bob")
        conv = await harness.conversation(alice, "bob")
        for client in (alice, bob):
            await join(client, conv)
        await bob.nothing_more(0.1)
        await alice.send_raw(f'{{"event":"message:send","ref":"deep","data":{{"conversation_id":"{conv}",'
                             f'"type":"text","content":"x","metadata":{{"a":{nested}}}}}}}')
        events = await alice.nothing_more(0.5)
        replies = [e for e in events if e.get("ref") == "deep"]
        assert len(replies) == 1, events
        reply = replies[0]
        if reply["event"] == "error":
            assert reply["data"]["code"] in ("VALIDATION_ERROR", "MESSAGE_TOO_LARGE"), reply
            assert str(reply["data"]["details"].get("field", "")).startswith("metadata"), reply
        else:
            assert reply["event"] == "message:new", reply
            got = await bob.expect("message:new")
            assert got["data"]["message"] == reply["data"]["message"]
        for client in (alice, bob):
            await history(client, conv)
            await still_works(client)
        await still_works(await harness.connect("witness"))
    assert_nothing_crashed(caplog)
