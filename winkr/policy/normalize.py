"""One normalised ("folded") view of a message for the content filters, mapped back to it.

Both filters (block list, PII) match on :func:`fold`'s output so that evasions by encoding
fail: full-width and mathematical letters, Cyrillic/Greek look-alikes, accents, digits of
other scripts, Unicode dashes and dots, and invisible characters inside words all fold to
the plain form. :attr:`Folded.origin` maps every folded position back to the sender's text,
so a span found in the folded text masks exactly the characters the sender typed.

Per character, in this order:

- whitespace becomes ``" "`` (line breaks ``"\\n"``);
- invisible characters are removed: format characters (Cf: zero-width space/joiners,
  bidi overrides, soft hyphen, tags), controls (Cc), combining marks and variation
  selectors (Mn, Me), and the blank Hangul fillers and braille blank;
- a decimal digit of any script (``٣``, ``३``, ``３``) becomes its ASCII digit;
- NFKC compatibility mapping (``ｓ`` → ``s``, ``𝐬`` → ``s``, ``＠`` → ``@``, ``ﬀ`` → ``ff``);
- Unicode's confusables table (TR39, via the ``confusable_homoglyphs`` package): a
  character that imitates an ASCII letter or ``. - / @ _ :`` becomes it (Cyrillic ``ѕ``,
  ``һ``, ``і``; Greek ``ι``; also through the upper case, so Cyrillic ``т`` → ``t``);
- other dashes (Pd) become ``-``; accents are stripped from precomposed letters;
- everything is lowercased.

ASCII text without control characters takes a fast path (``str.lower``, identity map).
"""
from __future__ import annotations

import functools
import re
import string
import unicodedata

__all__ = ["Folded", "fold", "is_blank", "load_tables"]

# Blank-looking letters and symbols that Unicode does not class as format characters.
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Mn", "Me"})
_MARKS = frozenset({"Mn", "Me"})
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# Targets of the confusables fold: ASCII letters (lower case wins over upper case when a
# character imitates both) and the punctuation the PII patterns care about.
_CONFUSABLE_TARGETS = string.ascii_lowercase + string.ascii_uppercase + ".-/@_:"
# Dot-like characters the confusables table leaves alone but senders use for "." in
# addresses ("jane@example。com").
_DOTS = frozenset("\u3002\uff61\u00b7\u2022\u2219\u22c5\u30fb")
# Latin letters Unicode's confusables table leaves alone, recognised by their names: a
# letter with a hook/stroke/tail, a small capital, a negative squared or circled letter.
_LATIN_BY_NAME = re.compile(
    r"(?:NEGATIVE (?:SQUARED|CIRCLED) )?LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL )?"
    r"([A-Z])(?: WITH [A-Z -]+)?"
)
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_NOT_ONE_TO_ONE = re.compile("\x00")
# Per-character results are cached, but not without bound: a sender cycling through every
# code point must not grow the process by hundreds of megabytes.
_MAX_CACHED_CHARS = 50_000


class Folded:
    """``text`` folded from ``original``; ``origin[i]`` is the original index of ``text[i]``
    (``None`` when the two line up one to one)."""

    __slots__ = ("origin", "original", "text")

    def __init__(self, original: str, text: str, origin: list[int] | None) -> None:
        self.original = original
        self.text = text
        self.origin = origin

    def span_in_original(self, start: int, end: int) -> tuple[int, int]:
        """The original span holding folded ``[start, end)`` (``end > start``); characters the
        fold removed inside the span (invisible ones) are included."""
        if self.origin is not None:
            start, end = self.origin[start], self.origin[end - 1] + 1
            # Combining marks (accents, keycap enclosures, variation selectors) belong to the
            # character before them: "t\u0301" is masked as a whole, not as "*\u0301".
            original = self.original
            while end < len(original) and unicodedata.category(original[end]) in _MARKS:
                end += 1
        return start, end


@functools.cache
def _confusables() -> tuple[dict[str, str], dict[str, str]]:
    """Non-ASCII character → the ASCII character it imitates (built once, ~50 ms): one table
    from the lower-case targets (and punctuation), one from the upper-case ones."""
    # Imported here: loading the package's table costs ~50 ms, which every `winkr` command
    # would pay at import time otherwise; the first non-ASCII message pays it once instead.
    from confusable_homoglyphs.confusables import confusables_data

    lower: dict[str, str] = {}
    upper: dict[str, str] = {}
    for target in _CONFUSABLE_TARGETS:
        table = upper if target.isupper() else lower
        for entry in confusables_data.get(target, ()):
            ch = entry["c"]
            if len(ch) == 1 and not ch.isascii():
                table.setdefault(ch, target.lower())
    return lower, upper


def load_tables() -> None:
    """Load the confusables table now (~50 ms) instead of at the first non-ASCII message."""
    _confusables()


def _confusable(ch: str) -> str | None:
    # An upper-case character imitates an upper-case letter first: Cyrillic "І" is "I"
    # (folded "i"), although Unicode also lists it as confusable with "l".
    lower, upper = _confusables()
    first, second = (upper, lower) if ch.isupper() else (lower, upper)
    return first.get(ch) or second.get(ch)


def _is_invisible(ch: str) -> bool:
    return unicodedata.category(ch) in _INVISIBLE_CATEGORIES or ch in _FILLERS


def _fold_char(ch: str, depth: int = 0) -> str:
    if ch.isspace():
        return "\n" if ch in _LINE_BREAKS else " "
    if _is_invisible(ch):
        return ""
    if ch.isascii():
        return ch.lower()
    digit = unicodedata.decimal(ch, None)
    if digit is not None:
        return str(digit)
    compat = unicodedata.normalize("NFKC", ch)
    if compat != ch and depth < 3:
        return "".join(_fold_char(c, depth + 1) for c in compat)
    imitated = _confusable(ch)
    if imitated == "l" and ch.isupper() and _confusable(ch.lower()) == "i":
        return "i"  # Unicode folds capital-I look-alikes to "l"; Cyrillic "І" is an "i"
    if imitated is not None:
        return imitated
    named = _LATIN_BY_NAME.fullmatch(unicodedata.name(ch, ""))
    if named is not None:
        return named.group(1).lower()  # "ƒ", small capitals "ꜰᴜᴄᴋ", hooks "ʂɦɨʈ", "🅵"
    if ch in _DOTS:
        return "."
    if unicodedata.category(ch) == "Pd":
        return "-"
    decomposed = unicodedata.normalize("NFD", ch)
    if len(decomposed) > 1 and all(unicodedata.combining(c) for c in decomposed[1:]):
        return _fold_char(decomposed[0], depth + 1)  # "é" → "e", "ё" → "е" → "e"
    for other in (ch.upper(), ch.lower()):
        if len(other) == 1 and (imitated := _confusable(other)) is not None:
            return imitated
    lower = ch.lower()
    return lower if len(lower) == 1 else ch


class _FoldTable(dict[int, str]):
    """``str.translate`` table: code point → folded string, filled on first sight."""

    def __missing__(self, code: int) -> str:
        folded = _fold_char(chr(code))
        if len(self) < _MAX_CACHED_CHARS:
            self[code] = folded
        return folded


class _OneToOneTable(dict[int, str]):
    """``str.translate`` table marking with NUL every character that does not fold to
    exactly one character (removed, or expanded like ``ﬀ``)."""

    def __missing__(self, code: int) -> str:
        mark = chr(code) if len(_FOLD[code]) == 1 else "\x00"
        if len(self) < _MAX_CACHED_CHARS:
            self[code] = mark
        return mark


_FOLD = _FoldTable()
_ONE_TO_ONE = _OneToOneTable()


def fold(text: str) -> Folded:
    """The folded view of ``text`` (see the module docstring). Linear in ``len(text)``."""
    if text.isascii() and not _ASCII_CONTROL.search(text):
        return Folded(text, text.lower(), None)
    folded = text.translate(_FOLD)
    marks = text.translate(_ONE_TO_ONE)
    if "\x00" not in marks:
        return Folded(text, folded, None)
    origin: list[int] = []
    pos = 0
    for m in _NOT_ONE_TO_ONE.finditer(marks):
        i = m.start()
        origin.extend(range(pos, i))
        origin.extend([i] * len(_FOLD[ord(text[i])]))
        pos = i + 1
    origin.extend(range(pos, len(text)))
    return Folded(text, folded, origin)


@functools.lru_cache(maxsize=4096)
def _is_blank_char(ch: str) -> bool:
    return ch.isspace() or _is_invisible(ch)


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace and invisible characters (format
    characters, controls, combining marks, variation selectors, Hangul fillers)."""
    # Stops at the first visible character, so ordinary text costs one lookup.
    return all(map(_is_blank_char, text))
