"""The PROXY protocol (HAProxy's, versions 1 and 2) on the WebSocket port: behind a TCP load
balancer the peer of every connection is the balancer, so per-IP limits and logs would see
one address. With ``proxy_protocol_from`` set, a connection from one of those addresses must
open with a PROXY header naming the client; winkr then uses the client's address.

Strict by design (the spec: https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt):

- v1: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` (at most 107 bytes) or ``PROXY UNKNOWN…``
  (the balancer's own connection: the peer address stays).
- v2: the 12-byte signature, version 2, command LOCAL (health checks: the peer address
  stays) or PROXY with family TCP over IPv4 or IPv6; UNSPEC families keep the peer address;
  UDP and UNIX sockets are refused. TLVs are skipped. At most ``MAX_V2_BODY`` bytes.

Anything else from a trusted address — no header, a malformed one, one that never ends
within the handshake timeout — closes the connection. A connection from any other address is
served as before and a PROXY header from it is not honoured: it is not HTTP, so it gets the
plain-HTTP ``400`` like any other garbage (``winkr.plain_http``).

Parsed here with the standard library: the format is small, and ``proxy-protocol`` on PyPI
is asyncio-first. The API port does not take PROXY headers: it is for the app's backend on a
private network, has no per-IP limits, and hypercorn cannot parse them.
"""
from __future__ import annotations

import ipaddress
import struct

import attrs
import trio

V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107  # the spec's bound, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_BYTES = 16  # signature, version/command, family/transport, length
MAX_V2_BODY = 2048  # addresses (<= 216 bytes) and TLVs; real balancers send far less
READ_BYTES = 512

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderError(Exception):
    """A trusted peer's connection did not open with a valid PROXY header; says what was wrong
    (never echoes the bytes)."""


@attrs.frozen
class ProxyHeader:
    """What the header said: the client's address (None: LOCAL/UNKNOWN/UNSPEC, the peer's
    own) and the bytes read after the header (the start of the HTTP request)."""

    client_ip: str | None
    rest: bytes


def parse_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """``proxy_protocol_from`` entries (addresses or CIDR networks) as networks; ``ValueError``
    naming the first entry that is neither."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
    return tuple(networks)


def is_trusted(peer_ip: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``peer_ip`` (a socket's peer address) is in one of ``networks``; an IPv4-mapped
    IPv6 address counts as its IPv4 address."""
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:  # "local": an in-memory stream
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


async def read_proxy_header(stream: trio.abc.Stream) -> ProxyHeader:
    """Read one PROXY header (v1 or v2) from the start of ``stream``. Raises
    ``ProxyHeaderError`` when there is none or it is malformed; cancellation (the handshake
    timeout) propagates."""
    data = bytearray()

    async def more() -> None:
        chunk = await stream.receive_some(READ_BYTES)
        if not chunk:
            raise ProxyHeaderError("the connection ended inside the PROXY header")
        data.extend(chunk)

    while not (data.startswith(V1_PREFIX) or (data.startswith(V2_SIGNATURE) and len(data) >= V2_HEADER_BYTES)):
        if not (V1_PREFIX.startswith(data[:len(V1_PREFIX)]) or V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)])):
            raise ProxyHeaderError("the connection did not start with a PROXY header")
        await more()
    if data.startswith(V1_PREFIX):
        while (end := data.find(b"\r\n", 0, V1_MAX_BYTES)) < 0:
            if len(data) >= V1_MAX_BYTES:
                raise ProxyHeaderError("PROXY v1 header without CRLF within 107 bytes")
            await more()
        return ProxyHeader(_parse_v1(bytes(data[:end])), bytes(data[end + 2:]))
    length = struct.unpack_from("!H", data, 14)[0]
    if length > MAX_V2_BODY:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes (at most {MAX_V2_BODY})")
    while len(data) < V2_HEADER_BYTES + length:
        await more()
    end = V2_HEADER_BYTES + length
    return ProxyHeader(_parse_v2(data[12], data[13], bytes(data[V2_HEADER_BYTES:end])), bytes(data[end:]))


def _parse_v1(line: bytes) -> str | None:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 header is not ASCII") from None
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 header must be 'PROXY TCP4|TCP6 SRC DST SPORT DPORT' or 'PROXY UNKNOWN'")
    _, family, source, destination, source_port, destination_port = parts
    version = 4 if family == "TCP4" else 6
    for address in (source, destination):
        try:
            if ipaddress.ip_address(address).version != version:
                raise ValueError(address)
        except ValueError:
            raise ProxyHeaderError(f"PROXY v1 header: an address is not {family}") from None
    for port in (source_port, destination_port):
        if not (port.isdigit() and port == str(int(port)) and 0 <= int(port) <= 65535):
            raise ProxyHeaderError("PROXY v1 header: a port is not 0-65535 in decimal")
    return str(ipaddress.ip_address(source))


_TCP4, _TCP6 = 0x11, 0x21


def _parse_v2(version_command: int, family: int, body: bytes) -> str | None:
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header of version {version_command >> 4}")
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the balancer's own connection (a health check)
        return None
    if command != 0x1:
        raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
    if family == 0x00:  # UNSPEC: the balancer does not know; the peer address stays
        return None
    if family == _TCP4:
        if len(body) < 12:
            raise ProxyHeaderError("PROXY v2 TCP4 header shorter than its addresses")
        return str(ipaddress.IPv4Address(body[:4]))
    if family == _TCP6:
        if len(body) < 36:
            raise ProxyHeaderError("PROXY v2 TCP6 header shorter than its addresses")
        address = ipaddress.IPv6Address(body[:16])
        return str(address.ipv4_mapped or address)
    raise ProxyHeaderError(f"PROXY v2 header of family/transport 0x{family:02x} (only TCP over IPv4/IPv6)")
