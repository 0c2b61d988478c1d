"""Plain HTTP on the WebSocket port (issue 13, item 6): health checks answer 200, everything
else that is not a WebSocket upgrade gets a short 4xx body that says what to do, at once (not
after the handshake timeout) — and WebSocket upgrades still work. Real server code over
in-memory streams, MockClock."""
from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.testing
from conftest import Harness

from winkr.plain_http import MAX_HEAD_BYTES


async def exchange(harness: Harness, request: bytes) -> tuple[int, dict[str, str], bytes, float]:
    """Send raw bytes as a client, read until the server closes; returns the status, headers,
    body and the (mock) seconds until the server closed."""
    client, server_side = trio.testing.memory_stream_pair()
    harness.server.accept_stream(server_side)
    started = trio.current_time()
    await client.send_all(request)
    received = bytearray()
    with trio.fail_after(harness.settings.handshake_timeout * 2):
        while chunk := await client.receive_some(65536):
            received += chunk
    elapsed = trio.current_time() - started
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body, elapsed


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: chat.example.com\r\nUser-Agent: probe\r\n{extra}\r\n".encode()


@pytest.mark.parametrize("path", ["/health", "/healthz", "/health?probe=lb"])
async def test_health_answers_200_ok_at_once(harness: Harness, path: str) -> None:
    status, headers, body, elapsed = await exchange(harness, get(path))
    assert status == 200
    assert orjson.loads(body) == {"status": "ok"}
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    assert elapsed < 1.0  # answered and closed, not left to the 30 s handshake timeout


async def test_head_health_has_no_body(harness: Harness) -> None:
    status, headers, body, _ = await exchange(harness, get("/health", "HEAD"))
    assert status == 200 and body == b""
    assert int(headers["content-length"]) > 0


async def test_root_says_where_the_websocket_endpoint_is(harness: Harness) -> None:
    status, _, body, _ = await exchange(harness, get("/"))
    assert status == 200
    answer = orjson.loads(body)
    assert answer["websocket"] == "/ws" and answer["health"] == "/health"
    assert "WebSocket" in answer["message"] and "token" in answer["message"]


@pytest.mark.parametrize(("request_bytes", "status", "code", "hint"), [
    (get("/ws"), 426, "VALIDATION_ERROR", "Upgrade: websocket"),
    (get("/metrics"), 404, "NOT_FOUND", "/health"),
    (get("/health", "POST", "Content-Length: 2\r\n") + b"{}", 405, "VALIDATION_ERROR", "GET /health"),
    (b"GARBAGE\r\n\r\n", 400, "VALIDATION_ERROR", "malformed"),
    (get("/", extra="X-Big: " + "a" * (2 * MAX_HEAD_BYTES) + "\r\n"), 431, "VALIDATION_ERROR", "bytes"),
], ids=["ws-without-upgrade", "unknown-path", "post", "garbage", "huge-head"])
async def test_other_plain_requests_get_a_4xx_that_says_what_to_do(
        harness: Harness, request_bytes: bytes, status: int, code: str, hint: str) -> None:
    got, headers, body, elapsed = await exchange(harness, request_bytes)
    assert got == status, body
    error = orjson.loads(body)
    assert error["event"] == "error" and error["data"]["code"] == code, error
    assert hint in error["data"]["message"], error
    assert elapsed < 1.0
    if status == 426:
        assert headers["upgrade"] == "websocket"
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_a_client_that_closes_without_a_request_is_dropped_quietly(harness: Harness) -> None:
    client, server_side = trio.testing.memory_stream_pair()
    harness.server.accept_stream(server_side)
    await client.send_eof()
    with trio.fail_after(1):
        assert await client.receive_some(100) == b""


async def test_a_truncated_request_gets_400(harness: Harness) -> None:
    client, server_side = trio.testing.memory_stream_pair()
    harness.server.accept_stream(server_side)
    await client.send_all(b"GET /hea")
    await client.send_eof()
    received = bytearray()
    with trio.fail_after(1):
        while chunk := await client.receive_some(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 "), received


async def test_websocket_upgrades_still_work_after_plain_requests(harness: Harness) -> None:
    status, _, _, _ = await exchange(harness, get("/health"))
    assert status == 200
    alice = await harness.connect("alice")  # the upgrade, replayed to trio-websocket
    reply: dict[str, Any] = await alice.request("conversation:list", {})
    assert reply["event"] == "conversation:list", reply


KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
UPGRADE = "Connection: Upgrade\r\nUpgrade: websocket\r\n"


@pytest.mark.parametrize(("request_bytes", "status", "hint", "header"), [
    (f"GET /ws HTTP/1.1\r\nHost: h\r\n{UPGRADE}Sec-WebSocket-Version: 13\r\n\r\n".encode(), 400,
     "Sec-WebSocket-Key", None),
    (f"POST /ws HTTP/1.1\r\nHost: h\r\n{UPGRADE}{KEY}Sec-WebSocket-Version: 13\r\n\r\n".encode(), 405, "GET",
     ("allow", "GET")),
    (f"GET /ws HTTP/1.1\r\n{UPGRADE}{KEY}Sec-WebSocket-Version: 13\r\n\r\n".encode(), 400, "Host", None),
    (f"GET /ws HTTP/1.1\r\nHost: h\r\n{UPGRADE}{KEY}Sec-WebSocket-Version: 8\r\n\r\n".encode(), 426, "version 13",
     ("sec-websocket-version", "13")),
], ids=["no-key", "post", "no-host", "version-8"])
async def test_a_malformed_upgrade_gets_a_json_answer_that_says_what_is_missing(
        harness: Harness, request_bytes: bytes, status: int, hint: str, header: tuple[str, str] | None) -> None:
    """Once: wsproto's bare 400/426 with no body and no hint (breaker, issue 13)."""
    got, headers, body, elapsed = await exchange(harness, request_bytes)
    assert got == status and elapsed < 1
    error = orjson.loads(body)
    assert error["event"] == "error" and hint in error["data"]["message"], error
    if header is not None:
        assert headers[header[0]] == header[1]


async def test_a_tls_handshake_on_the_plain_port_is_closed_at_once(harness: Harness) -> None:
    """A client that expected wss:// here sends a TLS ClientHello: closed at once, not after
    the 30 s handshake timeout."""
    client, server_side = trio.testing.memory_stream_pair()
    harness.server.accept_stream(server_side)
    await client.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32))
    with trio.fail_after(1):
        assert await client.receive_some(100) == b""
