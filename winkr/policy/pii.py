"""PII detection: e-mail addresses, phone numbers and Luhn-valid payment card numbers.

Tuned for chat: it must catch "+1 (415) 555-2671", "020 7946 0958" or "4111-1111-1111-1111"
but never flag the times, dates, prices, scores and counts ordinary messages are full of.
Phone numbers are judged by ``phonenumbers`` (leniency VALID), but only on short windows
around digit runs that could be one, because its matcher over a whole 2000-char message for
several regions costs tens of milliseconds.
"""
from __future__ import annotations

import re
from itertools import pairwise

import phonenumbers

__all__ = ["PHONE_REGIONS", "find_pii", "mask_pii"]

# Numbers written with "+" parse the same from any region; the regions add the national
# formats of the places most users dial from (see _regions_for).
PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN")
_TRUNK_ZERO_REGIONS = ("GB", "DE", "FR", "IN")  # national numbers start with trunk "0"
_NO_TRUNK_REGIONS = ("US", "IN")  # NANP never starts with 0; Indian mobiles often don't
_MIN_PHONE_DIGITS = 7  # shorter runs are never a valid number in these regions
_NO_TRUNK_DIGITS = (10, 12)  # "4155552671", "1 415…", "91 98765…" — anything else is not
_MAX_MATCH_DIGITS = 17  # longer runs are split into whole digit groups instead
_MAX_NUMBER_DIGITS = 15  # E.164 limit, for numbers cut out of a longer run
_MIN_CARD_DIGITS, _MAX_CARD_DIGITS = 13, 19
# phonenumbers looks a few characters either side of a candidate (a letter or currency sign
# glued to it, a ":30" making a date a timestamp); this much context is plenty.
_CONTEXT = 16
# Units of phonenumbers work per message (a parse ≈ 1, a matcher pass ≈ 2; ~0.1 ms each).
# Far more than any honest message needs; past it, candidates are masked unchecked.
_PHONE_BUDGET = 24
_VALID = phonenumbers.Leniency.VALID

_EMAIL = re.compile(
    # Local part starts at a token boundary; the domain is dot-separated labels. Possessive
    # pieces keep this linear on adversarial input; the TLD is checked separately.
    r"(?<![\w.%+-])[\w%+-][\w.%+-]*+@[^\W_][\w-]*+(?:\.[\w-]++)++"
)
_TLD = re.compile(r"[^\W\d_]{2,63}")
# A run that could hold a phone or card number: digit groups joined by 1-3 separator
# characters. It starts with a digit so the regex engine can skip ahead to one quickly; a
# "+" or "(" just before it is added in code.
_DIGIT_RUNS = re.compile(r"\d++(?:[ \t\u00a0().\-/]{1,3}+\d++)*+")
# Shapes phonenumbers rejects anyway, skipped up front because it is slow to say no.
_DATE = re.compile(r"\d{4}([-/.])\d{1,2}\1\d{1,2}|\d{1,2}([-/.])\d{1,2}\2\d{2,4}")
# 13-19 digits: contiguous, in groups of four (4-4-4-1..4, 4-4-4-4-1..3), or the 4-6-4/4-6-5
# Amex/Diners grouping; one separator kind per number.
_CARD = re.compile(
    r"(?<![\d.,])(?:\d{13,19}"
    r"|\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?"
    r"|\d{4}([ -])\d{6}\2\d{4,5})(?!\d)"
)
_DIGIT = re.compile(r"\d")
_DIGIT_RUN = re.compile(r"\d+")
_NO_DIGITS_TAIL = re.compile(r"\D*\Z")
_NO_DIGITS_HEAD = re.compile(r"\D*")


def _few_digits(text: str, minimum: int) -> bool:
    """True when ``text`` surely has fewer than ``minimum`` digits (a fast gate)."""
    # Ten C-level str.count passes beat any regex scan; non-ASCII text may hold other
    # digits phonenumbers understands (fullwidth, Arabic-Indic), so it is never gated.
    return text.isascii() and sum(map(text.count, "0123456789")) < minimum


def _candidates(text: str) -> list[tuple[int, int, int]]:
    """``(start, end, digit count)`` of every digit run with at least 7 digits."""
    found = []
    for m in _DIGIT_RUNS.finditer(text):
        n_digits = len(_DIGIT.findall(m.group()))
        if n_digits >= _MIN_PHONE_DIGITS:
            start = m.start() - 1 if m.start() and text[m.start() - 1] in "+(" else m.start()
            found.append((start, m.end(), n_digits))
    return found


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _email_spans(text: str) -> list[tuple[int, int]]:
    return [
        m.span() for m in _EMAIL.finditer(text) if _TLD.fullmatch(m.group().rsplit(".", 1)[1])
    ]


def _card_spans(text: str, candidates: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    spans = []
    for start, end, n_digits in candidates:
        if n_digits < _MIN_CARD_DIGITS:
            continue
        for m in _CARD.finditer(text, start, end):
            # The grouped forms may run into a trailing number ("4111 1111 1111 1111 12/27"),
            # so also try the match cut back at each group boundary, longest first.
            groups = list(_DIGIT_RUN.finditer(m.group()))
            for k in range(len(groups), 0, -1):
                digits = "".join(g.group() for g in groups[:k])
                if len(digits) < _MIN_CARD_DIGITS:
                    break
                if len(digits) <= _MAX_CARD_DIGITS and _luhn_ok(digits):
                    spans.append((m.start(), m.start() + groups[k - 1].end()))
                    break
    return spans


def _is_counting(raw: str) -> bool:
    # "1 2 3 4 5 6 7 8 9 10" is a valid US number to phonenumbers, but it is someone counting.
    runs = _DIGIT_RUN.findall(raw)
    if len(runs) < 4 or any(len(r) > 6 for r in runs):  # also keeps int() cheap
        return False
    groups = [int(r) for r in runs]
    return all(b == a + 1 for a, b in pairwise(groups))


def _regions_for(raw: str, n_digits: int) -> tuple[str, ...]:
    """Regions worth asking about ``raw``; empty when it cannot be a number in any of them."""
    head = raw.lstrip("(")
    if head.startswith("+"):
        return PHONE_REGIONS[:1]
    if head.startswith("0"):
        return _TRUNK_ZERO_REGIONS
    lo, hi = _NO_TRUNK_DIGITS
    return _NO_TRUNK_REGIONS if lo <= n_digits <= hi else ()


class _OutOfBudget(Exception):
    pass


class _PhoneScan:
    """Phone spans in one text, spending at most ``_PHONE_BUDGET`` on phonenumbers."""

    def __init__(self, text: str, candidates: list[tuple[int, int, int]]) -> None:
        self.text = text
        self.candidates = candidates
        self.budget = _PHONE_BUDGET
        self.spans: list[tuple[int, int]] = []

    def run(self) -> list[tuple[int, int]]:
        exhausted = False
        for start, end, n_digits in self.candidates:
            raw = self.text[start:end]
            if _DATE.fullmatch(raw) or _is_counting(raw):
                continue
            regions = _regions_for(raw, n_digits)
            long_run = n_digits > _NO_TRUNK_DIGITS[1]
            if not (regions or long_run):
                continue
            if exhausted:
                # Fail closed: a message stuffed with digit runs must not smuggle a number
                # through just because checking them all would cost too much.
                self.spans.append((start, end))
                continue
            try:
                found = False
                if regions and n_digits <= _MAX_MATCH_DIGITS:
                    found = self._match_window(start, end, regions)
                if not found and long_run:
                    # Several numbers, or one plus more digits: "415 555 2671 020 7946 0958".
                    self._split_run(start, raw)
            except _OutOfBudget:
                exhausted = True
                self.spans.append((start, end))
        return self.spans

    def _spend(self, cost: int) -> None:
        if self.budget < cost:
            raise _OutOfBudget
        self.budget -= cost

    def _match_window(self, start: int, end: int, regions: tuple[str, ...]) -> bool:
        # The matcher sees a little context: it rejects numbers glued to letters,
        # timestamps and the like by looking just outside the digits. The context stops
        # short of any other digit so each window holds one candidate (each costs a parse).
        lo, hi = max(0, start - _CONTEXT), min(len(self.text), end + _CONTEXT)
        before = _NO_DIGITS_TAIL.search(self.text, lo, start)
        after = _NO_DIGITS_HEAD.match(self.text, end, hi)
        lo = before.start() if before else start
        hi = after.end() if after else end
        window = self.text[lo:hi]
        for region in regions:
            self._spend(2)
            found = False
            for m in phonenumbers.PhoneNumberMatcher(window, region, _VALID):
                s, e = lo + m.start, lo + m.end
                if s < end and e > start and not _is_counting(m.raw_string):
                    self.spans.append((s, e))
                    found = True
            if found:
                return True
        return False

    def _split_run(self, offset: int, raw: str) -> None:
        # Try every stretch of whole digit groups that could be one number, longest first,
        # and continue after each number found (the matcher gives up on such runs).
        groups = [(offset + g.start(), offset + g.end()) for g in _DIGIT_RUN.finditer(raw)]
        i = 0
        while i < len(groups):
            # A leading "+" belongs to the first group only.
            start = groups[i][0] - (1 if i == 0 and raw.startswith("+") else 0)
            stretches, total = [], 0
            for j in range(i, len(groups)):
                total += groups[j][1] - groups[j][0]
                if total > _MAX_NUMBER_DIGITS:
                    break
                if total >= _MIN_PHONE_DIGITS:
                    stretches.append((j, total))
            i += 1
            for j, total in reversed(stretches):
                sub = self.text[start : groups[j][1]]
                regions = _regions_for(sub, total)
                if regions and not _is_counting(sub) and self._parses(sub, regions):
                    self.spans.append((start, groups[j][1]))
                    i = j + 1
                    break

    def _parses(self, sub: str, regions: tuple[str, ...]) -> bool:
        for region in regions:
            self._spend(1)
            try:
                if phonenumbers.is_valid_number(phonenumbers.parse(sub, region)):
                    return True
            except phonenumbers.NumberParseException:
                pass
        return False


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def find_pii(text: str) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ``(start, end)`` spans of PII in ``text`` (code point offsets)."""
    spans: list[tuple[int, int]] = []
    if "@" in text:
        spans += _email_spans(text)
    # Cheap gate: most messages have too few digits to hold a phone or card number, and
    # phonenumbers is by far the most expensive step.
    if not _few_digits(text, _MIN_PHONE_DIGITS):
        candidates = _candidates(text)
        spans += _PhoneScan(text, candidates).run()
        spans += _card_spans(text, candidates)
    return _merge(spans)


def mask_pii(text: str) -> tuple[str, bool]:
    """Replace every PII span with ``*`` of the same length; return (masked text, any masked)."""
    spans = find_pii(text)
    if not spans:
        return text, False
    parts, pos = [], 0
    for s, e in spans:
        parts += [text[pos:s], "*" * (e - s)]
        pos = e
    parts.append(text[pos:])
    return "".join(parts), True
