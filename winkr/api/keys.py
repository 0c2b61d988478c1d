"""Server-API keys (contract §13): configured (``api_keys`` / ``WINKR_API_KEYS``) or, with none
configured, one generated once and kept beside the database (mode 0600).

Decision (docs/server-api.md): ``winkr serve`` generates the key only when the API is on
(``api_port`` set) and no key is configured; ``winkr api-key`` prints the first configured key,
else the stored one, and generates it itself only when ``api_port`` is set in its own settings
(so it never makes a key a server would not use). Both create the file exclusively, so
whichever comes first wins and the other reads it.
"""
from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Sequence

from winkr.config import Settings

KEY_BYTES = 32


def stored_api_key(settings: Settings) -> str | None:
    """The generated key beside the database, if there is one."""
    path = settings.api_key_path
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        return None
    return key or None


def load_or_create_api_key(settings: Settings) -> tuple[str, bool]:
    """The stored key, or a new one written beside the database (mode 0600). Returns
    ``(key, created)``."""
    found = stored_api_key(settings)
    if found is not None:
        return found, False
    path = settings.api_key_path
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(KEY_BYTES)
    try:
        with open(path, "x", opener=lambda p, flags: os.open(p, flags, 0o600)) as f:
            f.write(key + "\n")
    except FileExistsError:  # made meanwhile by the other command
        return load_or_create_api_key(settings)
    return key, True


def api_keys(settings: Settings, *, create: bool) -> tuple[str, ...]:
    """The keys the server API accepts: the configured ones, else the stored (or, with
    ``create``, a newly generated) one. Empty when there is none and ``create`` is false."""
    if settings.api_keys:
        return settings.api_keys
    if create:
        return (load_or_create_api_key(settings)[0],)
    found = stored_api_key(settings)
    return (found,) if found is not None else ()


class KeyChecker:
    """Compares a presented key with every accepted one in constant time (no early exit, so
    the time says nothing about which key or how much of it matched)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [key.encode() for key in keys if key]

    def accepts(self, presented: str) -> bool:
        candidate = presented.encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(key, candidate)
        return matched
