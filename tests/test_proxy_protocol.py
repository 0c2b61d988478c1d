"""PROXY protocol v1/v2 on the WebSocket port (winkr/proxy_protocol.py): over real loopback
sockets, a connection from a ``proxy_protocol_from`` address must open with a PROXY header and
winkr then sees the client's address (per-IP limits, logs); a missing or malformed header
closes it; a PROXY header from any other address is not honoured.
"""
from __future__ import annotations

import ipaddress
import logging
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
from conftest import SECRET, make_settings, metric
from trio_websocket import ConnectionRejected, wrap_client_stream

from winkr.auth import mint_token
from winkr.config import ConfigError, Settings, load_settings
from winkr.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeaderError,
    is_trusted,
    parse_networks,
    read_proxy_header,
)
from winkr.server import Server

pytestmark = pytest.mark.sqlite_only  # the address of a client is not the database's business


def v1(source: str = "203.0.113.7", destination: str = "192.0.2.1", family: str = "TCP4") -> bytes:
    return f"PROXY {family} {source} {destination} 51234 443\r\n".encode()


def v2(source: str = "203.0.113.7", *, command: int = 0x1, family: int | None = None,
       tlvs: bytes = b"", version: int = 2) -> bytes:
    """A v2 header: PROXY (or LOCAL with command 0) over TCP, from ``source`` to a balancer port."""
    address = ipaddress.ip_address(source)
    if address.version == 4:
        body = address.packed + ipaddress.IPv4Address("192.0.2.1").packed + struct.pack("!HH", 51234, 443)
        default_family = 0x11
    else:
        body = address.packed + ipaddress.IPv6Address("2001:db8::1").packed + struct.pack("!HH", 51234, 443)
        default_family = 0x21
    if command == 0x0:
        body, default_family = b"", 0x00
    body += tlvs
    fam = default_family if family is None else family
    return V2_SIGNATURE + bytes([(version << 4) | command, fam]) + struct.pack("!H", len(body)) + body


# --- the parser on its own --------------------------------------------------------------------

class Chunks(trio.abc.ReceiveStream):
    """A stream that yields ``chunks`` one per read (headers split anywhere), then EOF."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.chunks.pop(0) if self.chunks else b""

    async def aclose(self) -> None:
        pass


def byte_by_byte(data: bytes) -> Chunks:
    return Chunks(*(data[i:i + 1] for i in range(len(data))))


@pytest.mark.parametrize(("header", "client_ip"), [
    (v1(), "203.0.113.7"),
    (v1("2001:db8::7", "2001:db8::1", "TCP6"), "2001:db8::7"),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (v2(), "203.0.113.7"),
    (v2("2001:db8::7"), "2001:db8::7"),
    (v2("::ffff:203.0.113.9"), "203.0.113.9"),
    (v2(command=0x0), None),  # LOCAL: the balancer's health check
    (v2(tlvs=b"\x04\x00\x03abc"), "203.0.113.7"),  # a TLV is skipped
    (v2(family=0x00), None),  # UNSPEC
])
async def test_valid_headers_name_the_client_and_keep_what_follows(header: bytes, client_ip: str | None) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    for stream in (Chunks(header + request), byte_by_byte(header + request)):
        parsed = await read_proxy_header(stream)
        assert parsed.client_ip == client_ip
        rest = parsed.rest + b"".join(stream.chunks)
        assert rest == request


@pytest.mark.parametrize(("data", "reason"), [
    (b"GET /ws HTTP/1.1\r\n\r\n", "did not start with a PROXY header"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\n" + b"x" * 100, "without CRLF"),  # LF only
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\nGET / HTTP/1.1\r\n", "must be 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 " + b"4" * 100 + b"\r\n", "without CRLF within 107"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "must be 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "must be 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 2001:db8::7 5.6.7.8 1 2\r\n", "not TCP4"),
    (b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n", "not TCP6"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n", "not ASCII"),
    (b"PROXY TCP4 1.2.3.4", "ended inside"),  # truncated
    (v2(version=1), "version 1"),
    (v2(command=0x2), "unknown command"),
    (v2(family=0x12), "family/transport 0x12"),  # UDP over IPv4
    (v2(family=0x31), "family/transport 0x31"),  # a UNIX socket
    (v2()[:16] + b"\x01\x02", "ended inside"),  # shorter than its length says
    (V2_SIGNATURE + b"\x21\x11\x00\x04\x01\x02\x03\x04", "shorter than its addresses"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most 2048"),
    (V2_SIGNATURE[:8] + b"X", "did not start with a PROXY header"),
])
async def test_malformed_headers_are_refused_saying_why(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason):
        await read_proxy_header(Chunks(data))
    with pytest.raises(ProxyHeaderError, match=reason):
        await read_proxy_header(byte_by_byte(data))


def test_trusted_addresses_are_addresses_or_networks() -> None:
    networks = parse_networks(("127.0.0.1", "10.0.0.0/24", "2001:db8::/32"))
    assert is_trusted("127.0.0.1", networks) and is_trusted("10.0.0.77", networks)
    assert is_trusted("::ffff:10.0.0.3", networks) and is_trusted("2001:db8::9", networks)
    assert not is_trusted("10.0.1.1", networks) and not is_trusted("local", networks)
    assert not is_trusted("127.0.0.1", ())
    with pytest.raises(ValueError, match="'lb.internal' is not an IP address or network"):
        parse_networks(("lb.internal",))


def test_the_setting_is_checked_and_comes_from_the_environment(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"WINKR_PROXY_PROTOCOL_FROM: '10\.0\.0\.300' is not an IP"):
        load_settings(None, {"db": str(tmp_path / "w.db")}, environ={"WINKR_PROXY_PROTOCOL_FROM": "10.0.0.300"})
    settings = load_settings(None, {"db": str(tmp_path / "w.db")},
                             environ={"WINKR_PROXY_PROTOCOL_FROM": "10.0.0.5, 10.0.1.0/24"})
    assert settings.proxy_protocol_from == ("10.0.0.5", "10.0.1.0/24")


# --- a server on loopback (real clock) --------------------------------------------------------

@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Server, int]]:
    server = Server(settings, SECRET)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        try:
            yield server, server.ports[0]
        finally:
            server.request_shutdown()


def token(settings: Settings, user_id: str) -> str:
    return mint_token(settings, SECRET, user_id, ttl=3600, now=time.time(), username=user_id)


async def upgrade(port: int, prefix: bytes, headers: list[tuple[str, str]]) -> dict[str, Any]:
    """Send ``prefix`` then a WebSocket handshake; the first event, or the refusal's status and body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(prefix)
    rejections: list[ConnectionRejected] = []
    first: dict[str, Any] = {}
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/ws", extra_headers=headers)
                first = orjson.loads(await ws.get_message())
            await ws.aclose()
    except* ConnectionRejected as group:
        rejections.extend(e for e in group.exceptions if isinstance(e, ConnectionRejected))
    if rejections:
        return {"status": rejections[0].status_code, "body": orjson.loads(rejections[0].body or b"{}")}
    return first


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``; everything the server answers until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    answer = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(4096):
            answer += chunk
    await stream.aclose()
    return answer


HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


@pytest.mark.trio(run=trio.run)
@pytest.mark.parametrize("header", [v1(), v2(), v2("2001:db8::7"), v2(command=0x0)],
                         ids=["v1", "v2-tcp4", "v2-tcp6", "v2-local"])
async def test_a_trusted_balancer_header_then_the_websocket_handshake(tmp_path: Any, header: bytes) -> None:
    settings = make_settings(tmp_path, proxy_protocol_from=["127.0.0.1"])
    async with serving(settings) as (_, port):
        hello = await upgrade(port, header, [("Authorization", f"Bearer {token(settings, 'alice')}")])
        assert hello["event"] == "connection:established", hello
        assert (await raw_exchange(port, header + HEALTH)).startswith(b"HTTP/1.1 200 ")


@pytest.mark.trio(run=trio.run)
@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
async def test_per_ip_limits_and_logs_see_the_client_address(
        tmp_path: Any, header: bytes, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path, proxy_protocol_from=["127.0.0.0/8"],
                             limits={"failed_handshakes_per_minute_per_ip": 2})
    bad_token = [("Authorization", "Bearer not-a-token")]
    caplog.set_level(logging.INFO, logger="winkr.server")
    async with serving(settings) as (_, port):
        for _ in range(2):
            assert (await upgrade(port, header, bad_token))["status"] == 401
        limited = await upgrade(port, header, bad_token)
        assert limited["status"] == 429, limited
        assert limited["body"]["data"]["message"] == "too many failed handshakes from this address"
        # Another client behind the same balancer is not limited by 203.0.113.7's failures,
        # and neither is the balancer's own address.
        other = v1("198.51.100.4") if header.startswith(b"PROXY") else v2("198.51.100.4")
        assert (await upgrade(port, other, bad_token))["status"] == 401
        assert (await upgrade(port, v2(command=0x0), bad_token))["status"] == 401
    refused_from = {r.__dict__.get("ip") for r in caplog.records if r.getMessage() == "handshake refused"}
    assert refused_from == {"203.0.113.7", "198.51.100.4", "127.0.0.1"}


@pytest.mark.trio(run=trio.run)
@pytest.mark.parametrize("data", [
    HEALTH,  # no header at all
    b"PROXY TCP4 203.0.113.7 192.0.2.1 51234\r\n" + HEALTH,
    v2(family=0x12) + HEALTH,
    v2(command=0x0)[:14],  # truncated, then the client closes its side
], ids=["none", "v1-fields", "v2-udp", "v2-truncated"])
async def test_a_trusted_address_without_a_valid_header_is_closed_unanswered(
        tmp_path: Any, data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path, proxy_protocol_from=["127.0.0.1"])
    caplog.set_level(logging.INFO, logger="winkr.server")
    async with serving(settings) as (server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(data)
        await stream.send_eof()
        with trio.fail_after(10):
            assert await stream.receive_some(4096) == b""
        await stream.aclose()
        assert metric(server.metrics.text(), "winkr_proxy_headers_refused_total") == 1
    assert [r.__dict__.get("ip") for r in caplog.records if r.getMessage() == "PROXY header refused"] == ["127.0.0.1"]


@pytest.mark.trio(run=trio.run)
async def test_a_trusted_address_that_sends_nothing_is_closed_at_the_handshake_timeout(tmp_path: Any) -> None:
    settings = make_settings(tmp_path, proxy_protocol_from=["127.0.0.1"], handshake_timeout=0.3)
    async with serving(settings) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        started = trio.current_time()
        with trio.fail_after(10):
            assert await stream.receive_some(4096) == b""
        assert trio.current_time() - started >= 0.25
        await stream.aclose()


@pytest.mark.trio(run=trio.run)
@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
async def test_a_header_from_an_untrusted_address_is_refused(tmp_path: Any, header: bytes) -> None:
    for trusted in ([], ["10.0.0.5"]):  # off, and on for another address
        settings = make_settings(tmp_path, proxy_protocol_from=trusted)
        async with serving(settings) as (server, port):
            assert (await raw_exchange(port, header + HEALTH)).startswith(b"HTTP/1.1 400 ")
            refused = await upgrade(port, header, [("Authorization", f"Bearer {token(settings, 'alice')}")])
            assert refused.get("event") != "connection:established", refused
            # Without a header that address is served as before.
            assert (await raw_exchange(port, HEALTH)).startswith(b"HTTP/1.1 200 ")
            assert metric(server.metrics.text(), "winkr_proxy_headers_refused_total") == 0
