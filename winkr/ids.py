"""Identifiers, canonical by construction: every id has exactly one spelling.

- A **user id** (a token's ``sub``, a ``participant_ids`` entry) is 1–64 code points with no
  control, format, surrogate or unassigned characters: what a log line, a JSON encoder and
  a database key can all carry unchanged, and what cannot hide a separator.
- A **message id** is ``"<conversation_id>.<seq>"`` with ``seq`` a positive integer in ASCII
  digits, no sign and no leading zero: ``.01``, ``.١`` (Arabic-Indic one) or ``.²`` are not
  other spellings of ``.1``; they name no message.
- A two-person conversation's **pair key** is an injective encoding of the sorted pair
  (JSON), so no two different pairs share one.

Pure functions; no I/O.
"""
from __future__ import annotations

import re
import unicodedata

import orjson

MAX_ID_CHARS = 64
MAX_SEQ_DIGITS = 18  # < 2**63: fits SQLite's and PostgreSQL's bigint

_SEQ = re.compile(f"[1-9][0-9]{{0,{MAX_SEQ_DIGITS - 1}}}")
# Cc control, Cf format (zero-width, bidi overrides), Cs surrogate, Co private use, Cn unassigned.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def user_id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid user id, or ``None`` when it is."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        return f"must be a string of 1-{MAX_ID_CHARS} characters"
    if not value.isprintable() or any(unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in value):
        return "must not contain control, format or unpaired surrogate characters"
    if value != value.strip():
        return "must not start or end with white space"
    return None


def message_id(conversation_id: str, seq: int) -> str:
    """The id of message ``seq`` of a conversation."""
    return f"{conversation_id}.{seq}"


def parse_message_id(conversation_id: str, value: str) -> int | None:
    """The ``seq`` that ``value`` names within ``conversation_id``, if it is that message's one
    spelling; ``None`` otherwise (the caller answers ``NOT_FOUND``)."""
    prefix, dot, seq = value.rpartition(".")
    if not dot or prefix != conversation_id or _SEQ.fullmatch(seq) is None:
        return None
    return int(seq)


def pair_key(user_a: str, user_b: str) -> str:
    """The key that finds the one open two-person conversation of a pair (order-independent)."""
    return orjson.dumps(sorted((user_a, user_b))).decode()
