#!/usr/bin/env python3
"""The browser demo: a static chat page on clients/js/winkr-client.js, served on loopback.

usage: python scripts/demo.py [--mint-demo-tokens] [--port 8000] [--db FILE | --ws-url URL]

It starts `winkr serve` on 127.0.0.1 (a fresh database in a temporary folder unless --db is
given), serves the page on http://127.0.0.1:PORT/ and prints the two addresses to open, one
per tab: ?user=alice and ?user=bob (carol too, for unread badges). With --ws-url it uses a
server that is already running instead of starting one.

Tokens. Without --mint-demo-tokens the page asks for a token (paste one from
`winkr token alice --db FILE`). With --mint-demo-tokens the page gets short-lived tokens
from GET /token?user=NAME, signed with the server's secret. That endpoint exists only when
the flag is given AND the page is bound to a loopback address (127.0.0.0/8, ::1,
localhost); any other --host with the flag is refused (exit 2), and requests from
non-loopback peers get 403. `winkr serve` itself never mints tokens.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import mimetypes
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

if __package__ in (None, ""):  # `python scripts/demo.py`: the checkout's root, so that `scripts` and winkr import
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts._common import REPO, ServerDidNotStart, start_server, stop
from winkr.auth import mint_token
from winkr.config import load_settings

DEMO_DIR = REPO / "clients" / "demo"
CLIENT_JS = REPO / "clients" / "js" / "winkr-client.js"
USER_ID = re.compile(r"^[a-z0-9_-]{1,32}$")
TOKEN_TTL_S = 15 * 60  # short: the page's token function renews it (auth:refresh)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class DemoHandler(BaseHTTPRequestHandler):
    server_version = "winkr-demo"
    ws_url = ""
    minter: Any = None  # callable(user_id) -> token, or None when minting is off

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._file(DEMO_DIR / "index.html")
        elif path == "/winkr-client.js":
            self._file(CLIENT_JS)
        elif path == "/config.json":
            self._json(HTTPStatus.OK, {"ws_url": self.ws_url, "mint": self.minter is not None})
        elif path == "/token":
            self._token()
        elif path.startswith("/demo/") and "/." not in path:
            self._file(DEMO_DIR / path.removeprefix("/demo/"))
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def _token(self) -> None:
        if self.minter is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "token minting is off (start with --mint-demo-tokens)"})
            return
        # The Host header too: a page on another site could reach a loopback address through
        # DNS rebinding, but its requests still name that site's host.
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0] if self.headers.get("Host") else ""
        if not is_loopback(self.client_address[0]) or not is_loopback(host):
            self._json(HTTPStatus.FORBIDDEN, {"error": "demo tokens are for loopback clients only"})
            return
        user = (parse_qs(urlsplit(self.path).query).get("user") or [""])[0]
        if not USER_ID.match(user):
            self._json(HTTPStatus.BAD_REQUEST, {"error": "user must be 1-32 of a-z 0-9 _ -"})
            return
        self._json(HTTPStatus.OK, {"token": self.minter(user)})

    def _file(self, path: Path) -> None:
        try:
            body = path.resolve().read_bytes()
        except OSError:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        if not path.resolve().is_relative_to(REPO / "clients"):
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        kind = "text/javascript" if path.suffix == ".js" else mimetypes.guess_type(path.name)[0]
        self._send(HTTPStatus.OK, body, f"{kind or 'application/octet-stream'}; charset=utf-8")

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
        pass  # the token endpoint's query names users: keep requests out of the terminal


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address of the page (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port of the page (default 8000; 0: any)")
    parser.add_argument("--db", help="database for the server it starts (default: a temporary one)")
    parser.add_argument("--ws-url", help="use this running server instead of starting one")
    parser.add_argument("--mint-demo-tokens", action="store_true",
                        help="serve GET /token?user=NAME (loopback only): never on a production setup")
    args = parser.parse_args(argv)
    if args.mint_demo_tokens and not is_loopback(args.host):
        print("demo: --mint-demo-tokens is refused on a non-loopback --host", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="winkr-demo-")) if not args.db and not args.ws_url else None
    db = Path(args.db).resolve() if args.db else (workdir / "demo.db" if workdir else None)
    env = {k: v for k, v in os.environ.items() if k != "WINKR_DB"}
    if workdir is not None:  # a throwaway server: a throwaway secret
        env["WINKR_JWT_SECRET"] = secrets.token_urlsafe(32)
    settings = load_settings(None, {"db": str(db) if db else None}, environ=env)
    server = None
    try:
        if args.ws_url:
            ws_url = args.ws_url
        else:
            assert db is not None
            try:
                server = start_server(["--db", str(db)], env=env)
            except ServerDidNotStart as exc:
                print(f"demo: {exc}", file=sys.stderr)
                return 1
            ws_url = server.url
        if args.mint_demo_tokens:
            secret = settings.jwt_secret
            if settings.jwt_algorithm == "HS256" and not secret:
                if not settings.secret_path.exists():
                    print("demo: no secret to sign with: give the server's --db or WINKR_JWT_SECRET",
                          file=sys.stderr)
                    return 2
                secret = settings.secret_path.read_text().strip()

            def minter(user: str) -> str:
                return mint_token(settings, secret, user, ttl=TOKEN_TTL_S, now=time.time(),
                                  username=user.capitalize())
            DemoHandler.minter = staticmethod(minter)
        DemoHandler.ws_url = ws_url
        page = ThreadingHTTPServer((args.host, args.port), DemoHandler)
        host, port = page.server_address[:2]
        base = f"http://{host}:{port}/"
        print(f"demo: chat server {ws_url}", flush=True)
        print(f"demo: open {base}?user=alice and {base}?user=bob in two tabs "
              f"({base}?user=carol for a third); Ctrl-C stops", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            page.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            page.server_close()
    finally:
        if server is not None:
            stop(server.proc)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
