"""Validation and filtering of one ``message:send`` by message type (contract §5, §11).

:func:`check_message` either returns the message as it will be stored and relayed, or
raises :class:`~winkr.errors.ProtocolError` whose ``field`` is a dotted path from the
request's ``data`` (``"content"``, ``"metadata.url"``).
"""
from __future__ import annotations

import math
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import attrs

from winkr.errors import (
    FORBIDDEN,
    INVALID_MESSAGE_TYPE,
    MESSAGE_TOO_LARGE,
    VALIDATION_ERROR,
    ProtocolError,
)
from winkr.policy.content_filter import compile_block_list, find_blocked, mask_spans
from winkr.policy.normalize import fold, is_blank, load_tables
from winkr.policy.pii import find_pii_in

__all__ = ["MESSAGE_TYPES", "PII_POLICIES", "CheckedMessage", "PolicySettings", "check_message"]

MESSAGE_TYPES = frozenset({"text", "photo", "photo_ephemeral", "location", "gift", "system"})
PII_POLICIES = ("mask", "reject", "allow")
_CONTENT_REQUIRED = frozenset({"text", "system"})
_SERVER_KEYS = ("filtered", "pii_masked")  # set by the server only, never by a client
_DEFAULT_TTL_SECONDS = 10
_TTL_RANGE = (1, 60)
_MAX_GIFT_ID_CHARS = 64


def _word_tuple(words: Iterable[str] | str) -> tuple[str, ...]:
    # A tuple (hashable) so the compiled block-list regex can be cached per list; a string
    # is read as the comma-separated form of WINKR_BLOCKED_WORDS.
    if isinstance(words, str):
        words = words.split(",")
    return tuple(dict.fromkeys(w.strip().lower() for w in words if w.strip()))


@attrs.frozen
class PolicySettings:
    """What the message policy needs from the service settings."""

    blocked_words: tuple[str, ...] = attrs.field(converter=_word_tuple)
    pii_policy: str = attrs.field(default="mask", validator=attrs.validators.in_(PII_POLICIES))
    max_text_chars: int = 2000
    max_encrypted_chars: int = 8000
    max_photo_bytes: int = 10 * 1024 * 1024
    max_url_chars: int = 2048

    def __attrs_post_init__(self) -> None:
        # Compile the block list (~0.15 s) and load the confusables table (~0.05 s) when the
        # settings are made (server start), not on the event loop at the first message.
        compile_block_list(self.blocked_words)
        load_tables()


MAX_METADATA_DEPTH = 16  # every frame that carries the message must still encode


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests deeper than ``limit`` levels (breadth-first, no recursion)."""
    level = [value]
    for _ in range(limit):
        level = [v for item in level if isinstance(item, (dict, list))
                 for v in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return False
    return True


class CheckedMessage(NamedTuple):
    """A message that passed policy: ``content`` as stored, ``metadata`` a fresh dict. (A
    NamedTuple: one per message, cheaper to build than a frozen attrs class.)"""

    type: str
    content: str
    metadata: dict[str, Any]


def _invalid(field: str, message: str) -> ProtocolError:
    return ProtocolError(VALIDATION_ERROR, message, field=field)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if _is_int(value):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _check_content(type_: str, content: object, encrypted: bool, settings: PolicySettings) -> str:
    if content is not None and not isinstance(content, str):
        raise _invalid("content", "content must be a string")
    if content is not None and "\x00" in content:  # PostgreSQL text cannot hold it; no client means it
        raise _invalid("content", "content must not contain NUL characters (U+0000)")
    # Blank means nothing visible: whitespace and invisible characters (zero-width spaces,
    # bidi overrides, Hangul fillers...) only. A blank caption is no caption.
    if content is None or is_blank(content):
        if type_ in _CONTENT_REQUIRED:
            raise _invalid("content", f"content is required and must not be blank for {type_}")
        return ""
    limit = settings.max_encrypted_chars if encrypted else settings.max_text_chars
    if len(content) > limit:
        raise ProtocolError(
            MESSAGE_TOO_LARGE, f"content is longer than {limit} characters", field="content"
        )
    return content


def _check_photo(meta: dict[str, Any], settings: PolicySettings) -> None:
    url = meta.get("url")
    if not isinstance(url, str) or not _is_https_url(url, settings.max_url_chars):
        raise _invalid(
            "metadata.url",
            f"metadata.url must be an https URL of at most {settings.max_url_chars} characters",
        )
    if "size_bytes" in meta:
        size = meta["size_bytes"]
        if not _is_int(size) or size < 0:
            raise _invalid("metadata.size_bytes", "metadata.size_bytes must be an integer >= 0")
        if size > settings.max_photo_bytes:
            raise ProtocolError(
                MESSAGE_TOO_LARGE,
                f"photo is larger than {settings.max_photo_bytes} bytes",
                field="metadata.size_bytes",
            )


def _is_https_url(url: str, max_chars: int) -> bool:
    # Whitespace or control characters have no place in a URL we hand to other clients.
    if len(url) > max_chars or any(ch.isspace() or ord(ch) < 32 for ch in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme == "https" and bool(parts.netloc) and bool(parts.hostname)
    except ValueError:  # e.g. an unbalanced "[" in an IPv6 host
        return False


def _check_photo_ephemeral(meta: dict[str, Any], settings: PolicySettings) -> None:
    _check_photo(meta, settings)
    ttl = meta.get("ttl_seconds", _DEFAULT_TTL_SECONDS)
    lo, hi = _TTL_RANGE
    if not _is_int(ttl) or not lo <= ttl <= hi:
        raise _invalid("metadata.ttl_seconds", f"metadata.ttl_seconds must be an integer {lo}-{hi}")
    meta["ttl_seconds"] = ttl


def _check_location(meta: dict[str, Any], settings: PolicySettings) -> None:
    for key, bound in (("latitude", 90), ("longitude", 180)):
        value = meta.get(key)
        if not isinstance(value, (int, float)) or not _is_number(value) or not -bound <= value <= bound:
            raise _invalid(f"metadata.{key}", f"metadata.{key} must be a number in ±{bound}")


def _check_gift(meta: dict[str, Any], settings: PolicySettings) -> None:
    gift_id = meta.get("gift_id")
    if _is_int(gift_id):
        return
    if not isinstance(gift_id, str) or not gift_id.strip() or len(gift_id) > _MAX_GIFT_ID_CHARS:
        raise _invalid(
            "metadata.gift_id",
            f"metadata.gift_id must be an integer or a string of 1-{_MAX_GIFT_ID_CHARS} "
            "characters",
        )


_METADATA_CHECKS: dict[str, Callable[[dict[str, Any], PolicySettings], None]] = {
    "photo": _check_photo,
    "photo_ephemeral": _check_photo_ephemeral,
    "location": _check_location,
    "gift": _check_gift,
}


def _filter_content(content: str, meta: dict[str, Any], settings: PolicySettings) -> str:
    """Block list and PII on one folded view; flags what was masked in ``meta``."""
    folded = fold(content)
    masked = find_blocked(folded, settings.blocked_words)
    if masked:
        meta["filtered"] = True
    if settings.pii_policy != "allow":
        pii = find_pii_in(folded)
        if pii and settings.pii_policy == "reject":
            raise _invalid(
                "content",
                "personal information (e-mail, phone or card number) is not allowed",
            )
        if pii:
            meta["pii_masked"] = True
            masked += pii
    return mask_spans(content, masked) if masked else content


def check_message(
    type_: object,
    content: object,
    metadata: object,
    *,
    is_service: bool,
    settings: PolicySettings,
) -> CheckedMessage:
    """Validate + filter one message:send. Raises ProtocolError on refusal.

    Never mutates ``metadata``; the result's metadata is a new dict without client-supplied
    ``filtered``/``pii_masked`` (the server sets them when it masked something) and, for
    ``photo_ephemeral``, with ``ttl_seconds`` filled in. Encrypted content is returned
    byte-identical.
    """
    if not isinstance(type_, str):
        raise _invalid("type", "type must be a string")
    if type_ not in MESSAGE_TYPES:
        raise ProtocolError(
            INVALID_MESSAGE_TYPE, f"unknown message type {type_[:64]!r}", field="type"
        )
    if type_ == "system" and not is_service:
        raise ProtocolError(FORBIDDEN, "only the service may send system messages", field="type")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise _invalid("metadata", "metadata must be an object")
    if metadata and _nests_deeper(metadata, MAX_METADATA_DEPTH):  # {} (most messages) nests one level
        raise _invalid("metadata", f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
    meta = {k: v for k, v in metadata.items() if k not in _SERVER_KEYS}
    encrypted = meta.get("encrypted", False)
    if not isinstance(encrypted, bool):
        raise _invalid("metadata.encrypted", "metadata.encrypted must be true or false")

    text = _check_content(type_, content, encrypted, settings)
    check = _METADATA_CHECKS.get(type_)
    if check is not None:
        check(meta, settings)
    # Ciphertext is opaque: masking would corrupt it, and the server can't read it anyway.
    if not encrypted and text:
        text = _filter_content(text, meta, settings)
    return CheckedMessage(type=type_, content=text, metadata=meta)
