"""A real webhook receiver for tests: an HTTP server on 127.0.0.1 in a daemon thread that
records every POST and answers with the next scripted status (then 200)."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs


@attrs.frozen
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.time() when the request was read
    status: int  # what the receiver answered
    client_port: int  # the sender's side of the TCP connection: the same one when kept alive


class Receiver:
    """``with Receiver(statuses=[500]) as r:`` ... ``r.url``, ``r.next(timeout)``."""

    def __init__(self, statuses: Iterable[int] = (), port: int = 0) -> None:
        self.statuses: queue.Queue[int] = queue.Queue()
        for status in statuses:
            self.statuses.put(status)
        self.received: queue.Queue[Received] = queue.Queue()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like most receivers

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                try:
                    status = receiver.statuses.get_nowait()
                except queue.Empty:
                    status = 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()
                receiver.received.put(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                               body, time.time(), status, self.client_address[1]))

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/winkr"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def next(self, timeout: float = 10.0) -> Received:
        """The next request received; fails after ``timeout`` real seconds."""
        try:
            return self.received.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no webhook request within {timeout} s") from None
