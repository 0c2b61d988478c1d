"""Structured logs: a record per connection open/close and per refused handshake, JSON lines
on request, and never a token, message content or PII in a line."""
from __future__ import annotations

import logging
from typing import Any

import orjson
import trio
from conftest import Harness, refused, until

from winkr.logs import JsonFormatter, TextFormatter


async def test_connection_and_refusal_records_carry_fields_but_no_secrets(harness: Harness, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    token = harness.token("alice")
    alice = await harness.connect("alice", token=token)
    conv = await harness.conversation(alice, "bob")
    secret_text = "call me at +1 415 555 2671 or jane.doe@example.com, the cake is a lie"
    await alice.request("message:send", {"conversation_id": conv, "content": secret_text, "type": "text"})
    await refused(harness, headers=[("Authorization", "Bearer forged.token.value")])
    await alice.close()
    # the server logs the close after its cleanup
    await until(lambda: any(r.getMessage() == "connection closed" for r in caplog.records))

    lines = [JsonFormatter().format(record) for record in caplog.records]
    lines += [TextFormatter().format(record) for record in caplog.records]
    for line in lines:
        for secret in (token, "forged.token.value", "cake is a lie", "jane.doe@example.com", "555 2671"):
            assert secret not in line, line

    entries = [orjson.loads(JsonFormatter().format(record)) for record in caplog.records]
    opened = [e for e in entries if e["msg"] == "connection open"]
    closed = [e for e in entries if e["msg"] == "connection closed"]
    refusals = [e for e in entries if e["msg"] == "handshake refused"]
    assert opened and opened[0]["user_id"] == "alice" and opened[0]["connection_id"]
    assert closed[0]["reason"] == "client_closed" and closed[0]["duration_s"] >= 0
    assert closed[0]["connection_id"] == opened[0]["connection_id"]
    assert refusals[0]["status"] == 401 and refusals[0]["code"] == "UNAUTHORIZED"
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in entries)


async def test_a_flood_of_refused_handshakes_logs_one_line_per_address_and_code_per_minute(
        harness: Harness, caplog: Any) -> None:
    """Found by probing: every refused handshake, the per-address 429s included, was one INFO
    line, so one client on loopback wrote ~800 lines (120 KB) a second. The count stays exact
    in winkr_handshakes_refused_total; the log keeps one line per address and code a minute."""
    caplog.set_level(logging.INFO)

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "handshake refused"]

    for _ in range(5):
        await refused(harness, headers=[("Authorization", "Bearer forged.token.value")])
    await refused(harness)  # another reason, the same code: the client could vary the reason at will
    await refused(harness, path="/elsewhere")  # another code
    assert [(r.status, r.code) for r in refusals()] == [(401, "UNAUTHORIZED"), (404, "NOT_FOUND")]  # type: ignore[attr-defined]
    await trio.sleep(61)
    await refused(harness, headers=[("Authorization", "Bearer forged.token.value")])
    later = refusals()[-1]
    assert len(refusals()) == 3 and later.suppressed == 5  # type: ignore[attr-defined]
