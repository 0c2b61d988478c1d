"""docs/deploy.md §8 (more than one node), followed literally where a tool can check it: the
HAProxy and nginx configurations in the doc parse (``haproxy -c``, ``nginx -t``); the doc's
HAProxy backend (PROXY v2 to the nodes, PROXY on its ``/readyz`` health checks) in front of a
real ``winkr serve`` with ``proxy_protocol_from``: the checks pass, clients get through, and
the node sees the client's address, not HAProxy's; and the same for the doc's nginx stream
server (PROXY v1).

HAProxy and nginx come from Debian (``.ci/run`` installs them); without them these tests skip
with one line each."""
from __future__ import annotations

import datetime
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import Servers

from scripts._common import RunningServer, kill

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"
SECRET = "deploy-cluster-test-secret-0123456789abcdef"
WAIT_SECONDS = 20.0

pytestmark = pytest.mark.sqlite_only


BAD_TOKEN_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     b"Authorization: Bearer not-a-token\r\n\r\n")
"""A WebSocket upgrade the node refuses (401) and logs with the client's address."""


def refused_handshakes(node: RunningServer) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The node's JSON log lines and its "handshake refused" lines, once there is one (or
    after WAIT_SECONDS)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        lines = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
        refused = [line for line in lines if line.get("msg") == "handshake refused"]
        if refused or time.monotonic() > deadline:
            return lines, refused
        time.sleep(0.1)


def doc_block(language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1, f"docs/deploy.md must have one ```{language} block"
    return blocks[0]


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {name}; .ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A self-signed certificate: (chain, key, both in one PEM as HAProxy wants it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    chain = cert.public_bytes(serialization.Encoding.PEM)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    paths = folder / "fullchain.pem", folder / "privkey.pem", folder / "both.pem"
    for path, data in zip(paths, (chain, private, chain + private)):
        path.write_bytes(data)
    return paths


def test_the_haproxy_config_parses(tmp_path: Path, certificate: tuple[Path, Path, Path]) -> None:
    haproxy = tool("haproxy")
    config = doc_block("haproxy").replace("/etc/haproxy/certs/chat.example.com.pem", str(certificate[2]))
    (tmp_path / "haproxy.cfg").write_text(config)
    result = subprocess.run([haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_nginx_config_parses(tmp_path: Path, certificate: tuple[Path, Path, Path]) -> None:
    nginx = tool("nginx")
    if not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        pytest.skip("nginx's stream module is not installed (apt-get install libnginx-mod-stream)")
    config = (doc_block("nginx")
              .replace("/etc/letsencrypt/live/chat.example.com/fullchain.pem", str(certificate[0]))
              .replace("/etc/letsencrypt/live/chat.example.com/privkey.pem", str(certificate[1])))
    (tmp_path / "nginx.conf").write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n" + config)
    result = subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the doc's backend in front of a real node -------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    started.kill_all()


def haproxy_in_front(tmp_path: Path, node_port: int,
                     dead_port: int | None = None) -> tuple[subprocess.Popen[str], int, Path]:
    """HAProxy with the doc's ``defaults`` and ``backend`` (TLS left out, one server: the node,
    after a server ``node-0`` on ``dead_port`` when given), listening on a free loopback port;
    (process, port, admin socket)."""
    doc = doc_block("haproxy")
    defaults = doc[doc.index("\ndefaults"):doc.index("\nfrontend")]
    backend = doc[doc.index("\nbackend winkr_nodes"):]
    servers = f"    server node-0 127.0.0.1:{dead_port}\n" if dead_port is not None else ""
    servers += f"    server node-1 127.0.0.1:{node_port}\n"
    backend = re.sub(r"(?m)^    server .*\n", "", backend) + servers
    port, admin = free_port(), tmp_path / "haproxy.sock"
    config = (f"global\n    stats socket {admin} level admin\n\n{defaults}"
              f"frontend winkr_plain\n    bind 127.0.0.1:{port}\n    default_backend winkr_nodes\n\n{backend}")
    (tmp_path / "haproxy.cfg").write_text(config)
    proc = subprocess.Popen([tool("haproxy"), "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "haproxy.stderr", "w"), text=True)
    return proc, port, admin


def admin_command(admin: Path, command: str) -> str:
    """The answer of HAProxy's runtime API to ``command``."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(admin))
        sock.sendall(command.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def server_state(admin: Path, server: str = "node-1") -> str:
    """``UP``/``DOWN``/... of ``server`` as HAProxy's health checks see it."""
    lines = admin_command(admin, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("pxname") == "winkr_nodes" and row.get("svname") == server:
            return row["status"]
    return "absent"


def exchange(port: int, request: bytes, source: str) -> bytes:
    """Send ``request`` from the loopback address ``source``; everything answered until close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_haproxy_with_the_documented_backend_sends_the_client_address(tmp_path: Path, servers: Servers) -> None:
    tool("haproxy")
    node = servers.start(tmp_path / "winkr.db", args=["--log-format", "json"], WINKR_JWT_SECRET=SECRET,
                         WINKR_PROXY_PROTOCOL_FROM="127.0.0.1")
    proc, port, admin = haproxy_in_front(tmp_path, node.port)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not (admin.exists() and server_state(admin).startswith("UP")):  # the /readyz checks pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "haproxy.stderr").read_text()
            time.sleep(0.1)
        # A client on 127.0.0.2 (HAProxy reaches the node from 127.0.0.1): a refused handshake
        # is logged with the client's address, and answered through HAProxy.
        assert exchange(port, BAD_TOKEN_UPGRADE, "127.0.0.2").startswith(b"HTTP/1.1 401 ")
        ready = exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.3")
        assert ready.startswith(b"HTTP/1.1 200 ") and b'"ready"' in ready
        # Straight to the node, without HAProxy's header, from the trusted address: closed unanswered.
        assert exchange(node.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.1") == b""
    finally:
        kill(proc)
    lines, refused = refused_handshakes(node)
    assert [line["ip"] for line in refused] == ["127.0.0.2"], lines
    assert [line["ip"] for line in lines if line.get("msg") == "PROXY header refused"] == ["127.0.0.1"]


def test_haproxy_sends_a_connection_refused_by_a_dead_node_to_another(tmp_path: Path, servers: Servers) -> None:
    """A node killed with kill -9 is still UP for HAProxy until its checks fail (``fall 2`` ×
    ``inter 2s``): meanwhile its clients reconnect, and each reconnect sent to it must go to
    another node (``option redispatch``), not fail after the retries and wait out the client's
    backoff (measured over loopback: 12.7 s to reconnect without it, 0.9 s with it)."""
    tool("haproxy")
    node = servers.start(tmp_path / "winkr.db", WINKR_JWT_SECRET=SECRET, WINKR_PROXY_PROTOCOL_FROM="127.0.0.1")
    proc, port, admin = haproxy_in_front(tmp_path, node.port, dead_port=free_port())
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not admin.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "haproxy.stderr").read_text()
            time.sleep(0.05)
        # node-0 is UP, as a killed node is until its checks have failed: held there.
        admin_command(admin, "set server winkr_nodes/node-0 health up")
        admin_command(admin, "disable health winkr_nodes/node-0")
        assert server_state(admin, "node-0") == "no check"  # up, unchecked: it gets connections
        while not server_state(admin).startswith("UP"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for _ in range(4):  # leastconn picks node-0 first; every request is answered by node-1
            ready = exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.1")
            assert ready.startswith(b"HTTP/1.1 200 "), ready
    finally:
        kill(proc)


def test_nginx_with_the_documented_stream_config_sends_the_client_address(tmp_path: Path, servers: Servers) -> None:
    nginx = tool("nginx")
    if not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        pytest.skip("nginx's stream module is not installed (apt-get install libnginx-mod-stream)")
    node = servers.start(tmp_path / "winkr.db", args=["--log-format", "json"], WINKR_JWT_SECRET=SECRET,
                         WINKR_PROXY_PROTOCOL_FROM="127.0.0.1")
    port = free_port()
    # The doc's config, TLS left out, its one upstream the node, one worker, files in tmp_path.
    config = re.sub(r"(?m)^        server 10\.0\.0\.1[23]:8080.*\n", "", doc_block("nginx"))
    config = (config.replace("10.0.0.11:8080", f"127.0.0.1:{node.port}")
              .replace("listen 443 ssl;", f"listen 127.0.0.1:{port};")
              .replace("worker_processes auto;", "worker_processes 1;"))
    config = re.sub(r"(?m)^\s*ssl_certificate(_key)? .*\n", "", config)
    # One process (no master and workers): killing it by its PID leaves nothing behind.
    (tmp_path / "nginx.conf").write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                                         f"daemon off;\nmaster_process off;\n{config}")
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "nginx.stderr", "w"), text=True)
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:  # nginx listening
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "nginx.stderr").read_text()
                time.sleep(0.1)
        assert exchange(port, BAD_TOKEN_UPGRADE, "127.0.0.4").startswith(b"HTTP/1.1 401 ")
        ready = exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", "127.0.0.5")
        assert ready.startswith(b"HTTP/1.1 200 "), ready
    finally:
        kill(proc)
    lines, refused = refused_handshakes(node)
    assert [line["ip"] for line in refused] == ["127.0.0.4"], lines
