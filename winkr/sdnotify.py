"""systemd readiness (``Type=notify``): tell the service manager "ready" once winkr listens, so
``systemctl start`` returns only when clients can connect and a start that fails is reported
as failed. Without ``$NOTIFY_SOCKET`` (not under systemd) nothing
happens. The protocol is one datagram on a Unix socket (sd_notify(3)); no library needed.
"""
from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (``"READY=1"``, ``"STOPPING=1"``, ...) to ``$NOTIFY_SOCKET``; True when
    sent. Never raises: readiness is a courtesy to the service manager, not a reason to fail."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True
