"""PII detection: e-mail addresses, phone numbers and Luhn-valid payment card numbers.

Tuned for chat: it must catch "+1 (415) 555-2671", "020 7946 0958", "4111-1111-1111-1111"
and their evasions, but never flag the times, dates, prices, scores and counts ordinary
messages are full of. Everything runs on the folded text (:mod:`winkr.policy.normalize`:
full-width and other scripts' digits are ASCII digits, ``＠``/``﹫`` are ``@``, invisible
characters are gone) and spans are mapped back to the sender's text.

- **Phones.** Digit groups joined by up to four separator characters of any kind
  (``415_555_2671``, ``415*555*2671``, ``415 / 555 / 2671``), with ``o``/``i``/``l`` read as
  digits inside a group that also holds digits (``4l5 555 267l``, Cyrillic ``О2О``).
  Dates, date ranges, times and year ranges are cut out first, and a run introduced by a
  reference word (``order number 123-456-7890``, ``tracking #``) is not a phone. What is
  left is judged by ``phonenumbers`` (leniency VALID; regions US, GB, DE, FR, IN, any
  ``+`` number), only on short windows around digit runs that could be one, because its
  matcher over a whole 2000-char message for several regions costs tens of milliseconds.
- **Cards.** 13-19 digits, contiguous or grouped 4-4-4-4(-3) / 4-6-5 with any separators
  (``4111.1111.1111.1111``), Luhn-checked.
- **E-mail.** ``local@domain.tld`` (spaces allowed around ``@``), ``(at)``/``[at]``/``{at}``
  and ``(dot)``/``[dot]``/``dot`` spelled forms; a bare word ``at`` only counts when the
  domain spells a dot too (``jane at example dot com``), so "look at google.com" is not an
  address.
"""
from __future__ import annotations

import re

import phonenumbers

from winkr.policy.normalize import Folded, fold

__all__ = ["PHONE_REGIONS", "find_pii", "find_pii_in", "mask_pii"]

# Numbers written with "+" parse the same from any region; the regions add the national
# formats of the places most users dial from (see _regions_for).
PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN")
# Digit counts of national numbers written with the trunk "0", per region.
_TRUNK_ZERO_LENGTHS = {"GB": (10, 11), "DE": (6, 15), "FR": (10, 10), "IN": (11, 11)}
_MIN_PHONE_DIGITS = 7  # shorter runs are never a valid number in these regions
_MAX_NATIONAL_DIGITS = 10  # past this a run that failed as a whole may hold a number + more
_MAX_MATCH_DIGITS = 17  # longer runs are split into whole digit groups instead
_MAX_NUMBER_DIGITS = 15  # E.164 limit, for numbers cut out of a longer run
_MIN_CARD_DIGITS, _MAX_CARD_DIGITS = 13, 19
# Below this many digits (before reading letters as digits) nothing can be a phone or card.
_GATE_DIGITS = 5
# phonenumbers looks a few characters either side of a candidate (a letter or currency sign
# glued to it, a ":30" making a date a timestamp); this much context is plenty.
_CONTEXT = 16
# Units of phonenumbers work per message (a parse ≈ 1, a matcher pass ≈ 2; ~0.1 ms each).
# Far more than any honest message needs; past it, candidates are masked unchecked.
_PHONE_BUDGET = 24
_VALID = phonenumbers.Leniency.VALID
# Stretches of digit groups examined per message when splitting runs (~0.3 µs each without a
# parse); a run of a thousand one-digit groups fails closed instead of costing milliseconds.
_MAX_STRETCHES = 600

# --- e-mail ---------------------------------------------------------------------------------
_OPEN, _CLOSE = r"[(\[{<]", r"[)\]}>]"
_AT = rf"(?:\ *+@\ *+|\ *+{_OPEN}\ *+at\ *+{_CLOSE}\ *+|\ ++at\ ++)"
_DOT = rf"(?:\.|\ *+{_OPEN}\ *+dot\ *+{_CLOSE}\ *+|\ ++dot\ ++)"
_EMAIL = re.compile(
    # Local part starts at a token boundary; the domain is dot-separated labels. Possessive
    # pieces keep this linear on adversarial input; the TLD is checked separately.
    rf"(?<![\w.%+'-])[\w%+-][\w.%+-]*+(?P<at>{_AT})(?P<domain>[^\W_][\w-]*+(?:{_DOT}[^\W_][\w-]*+)++)"
)
# "jane at gmail.com" is an address even with a real dot; "look at google.com" is not.
_MAIL_PROVIDER = re.compile(
    r"(?:gmail|googlemail|yahoo|ymail|hotmail|outlook|msn|icloud|aol|proton|protonmail|gmx"
    r"|yandex|zoho|fastmail|tutanota)\."
)
_SPELLED_DOT = re.compile(rf"{_OPEN}\ *dot\ *{_CLOSE}|\ dot\ ")
_TLD = re.compile(r"[^\W\d_]{2,63}")
_LAST_LABEL = re.compile(r"[\w-]+\Z")
_EMAIL_HINT = re.compile(rf"@|{_OPEN}\ *at\ *{_CLOSE}|\ at\ ")

# --- phones and cards -----------------------------------------------------------------------
# Any single non-alphanumeric character (not a line break) may separate digit groups.
_SEP_CHAR = r"(?:[^\w\n]|_)"
# A run that could hold a phone or card number: digit groups joined by 1-4 separator
# characters, except that a comma or semicolon only joins groups on its own ("415,555,2671"
# but not the list "12345, 23456, 34567"). It starts with a digit so the regex engine can
# skip ahead to one quickly; a "+" or "(" just before it is added in code.
_DIGIT_RUNS = re.compile(r"\d++(?:(?:(?:[^\w\n,;]|_){1,4}+|[,;])\d++)*+")
# Letters that stand in for digits inside a digit group: "4l5", "267l", "O2O".
_LETTER_DIGIT_HINT = re.compile(r"\d[oil]|[oil]\d")
_LETTER_DIGITS = re.compile(r"(?<![^\W_])(?:[oil]++\d|\d++[oil])[0-9oil]*+(?![^\W_])")
_LETTERS_AS_DIGITS = str.maketrans("oil", "011")
# Separators phonenumbers does not accept, rewritten to "-" (same length) before asking it.
_ODD_SEPARATORS = re.compile(r"[^\w\s()+.\-/]|_")
# Number shapes that are not phones; each must stand alone (not the middle of a longer chain
# of groups with the same separator, as in the French "01.02.03.04.05").
_NOT_PHONE = re.compile(
    r"(?<![\d.\-/])(?:"
    r"(?P<iy>\d{4})(?P<is>[-/.])(?P<im>\d{1,2})(?P=is)(?P<id>\d{1,2})(?!(?P=is)?\d)"
    r"|(?P<da>\d{1,2})(?P<ds>[-/.])(?P<db>\d{1,2})(?P=ds)(?P<dy>\d{4}|\d{2})(?!(?P=ds)?\d)"
    r"|(?P<th>\d{1,2}):(?P<tm>\d{2})(?::\d{2})?(?![:\d])"
    r"|(?P<y1>(?:19|20)\d{2})\ ?[-/]\ ?(?P<y2>(?:19|20)\d{2})(?![-/.]?\d)"
    r")"
)
# A number introduced by one of these is a reference, not a phone ("order number 123-456-7890").
_REFERENCE_BEFORE = re.compile(
    r"(?<![^\W_])(?:order|tracking|track|reference|ref|invoice|booking|confirmation|ticket|case"
    r"|receipt|serial|sku|isbn|item|parcel|package|shipment|pnr|transaction|txn|claim)"
    r"(?:[\s.:#-]*+(?:number|num|nr|no|id|code|#))?[\s.:#-]*+"
    # Earlier parts of the same code, each holding a digit ("1Z 999 AA1 0123 4567 84").
    r"(?:[^\W\d_]*+\d\w*+[\s.:#/-]++)*+[^\W\d_]*+\Z"
)
_REFERENCE_LOOKBACK = 48
# 13-19 digits: contiguous, in groups of four (4-4-4-1..4, 4-4-4-4-1..3), or the 4-6-4/4-6-5
# Amex/Diners grouping; any 1-3 separator characters between groups.
_CARD_SEP = rf"{_SEP_CHAR}{{1,3}}+"
_CARD = re.compile(
    rf"(?<!\d)(?<!\d[.,])(?:\d{{13,19}}"
    rf"|\d{{4}}{_CARD_SEP}\d{{4}}{_CARD_SEP}\d{{4}}{_CARD_SEP}\d{{1,4}}(?:{_CARD_SEP}\d{{1,3}})?"
    rf"|\d{{4}}{_CARD_SEP}\d{{6}}{_CARD_SEP}\d{{4,5}})(?!\d)"
)
# Issuer ranges of the card networks (Mastercard 2/5, Amex/Diners/JCB 3, Visa 4,
# Discover/UnionPay/Maestro 6); a Luhn-valid "1111 2222 3333 4444" is not a card.
_CARD_FIRST_DIGITS = "23456"
_DIGIT = re.compile(r"\d")
_ASCII_DIGIT = re.compile(r"[0-9]")  # folded text has ASCII digits only
_DIGIT_RUN = re.compile(r"\d+")
_NO_DIGITS_TAIL = re.compile(r"\D*\Z")
_NO_DIGITS_HEAD = re.compile(r"\D*")


def _digit_count(text: str) -> int:
    # Ten C-level str.count passes beat any regex scan (folded text has ASCII digits only).
    return sum(map(text.count, "0123456789"))


def _blank_not_phone(m: re.Match[str]) -> str:
    """A date/time/year range becomes letters (same length) so no digit run crosses it."""
    g = m.groupdict()
    if g["iy"]:
        ok = 1 <= int(g["im"]) <= 12 and 1 <= int(g["id"]) <= 31
    elif g["da"]:
        a, b = int(g["da"]), int(g["db"])
        ok = 1 <= a <= 31 and 1 <= b <= 31 and min(a, b) <= 12
    elif g["th"]:
        ok = int(g["th"]) <= 23 and int(g["tm"]) <= 59
    else:
        ok = True
    return "x" * (m.end() - m.start()) if ok else m.group()


def _phone_view(text: str) -> str:
    """``text`` (folded) with letter-digits read as digits and dates/times blanked out; the
    same length, so offsets carry over."""
    if _LETTER_DIGIT_HINT.search(text):
        text = _LETTER_DIGITS.sub(lambda m: m.group().translate(_LETTERS_AS_DIGITS), text)
    return _NOT_PHONE.sub(_blank_not_phone, text)


def _is_reference(text: str, start: int) -> bool:
    return _REFERENCE_BEFORE.search(text, max(0, start - _REFERENCE_LOOKBACK), start) is not None


def _candidates(text: str) -> list[tuple[int, int, int]]:
    """``(start, end, digit count)`` of every digit run with at least 7 digits."""
    found = []
    for m in _DIGIT_RUNS.finditer(text):
        n_digits = _digit_count(m.group())
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
    spans = []
    pos = 0
    while (m := _EMAIL.search(text, pos)) is not None:
        domain = m.group("domain")
        label = _LAST_LABEL.search(domain)
        plain_at = m.group("at").strip() == "at"
        if label and _TLD.fullmatch(label.group()) and label.group() != "dot" and not (
            plain_at and not _SPELLED_DOT.search(domain) and not _MAIL_PROVIDER.match(domain)
        ):
            spans.append(m.span())
            pos = m.end()
        else:
            # "look at google.com": not an address, but "me at jane@x.io" holds one later on.
            pos = m.start() + 1
    return spans


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
                if len(digits) <= _MAX_CARD_DIGITS and digits[0] in _CARD_FIRST_DIGITS and _luhn_ok(digits):
                    spans.append((m.start(), m.start() + groups[k - 1].end()))
                    break
    return spans


def _is_counting(raw: str) -> bool:
    # "1 2 3 4 5 6 7 8 9 10" is a valid US number to phonenumbers, but it is someone counting.
    # Stops at the first group that breaks the sequence (cheap on a 2000-character run).
    previous, groups = -1, 0
    for m in _DIGIT_RUN.finditer(raw):
        group = m.group()
        if len(group) > 6 or (groups and int(group) != previous + 1):
            return False
        previous, groups = int(group), groups + 1
    return groups >= 4


def _regions_for(raw: str, n_digits: int) -> tuple[str, ...]:
    """Regions worth asking about ``raw``; empty when it cannot be a number in any of them."""
    head = raw.lstrip("(")
    return _regions_for_digits("".join(_DIGIT_RUN.findall(raw)), plus=head.startswith("+"))


def _regions_for_digits(digits: str, plus: bool) -> tuple[str, ...]:
    """Regions worth asking about a number of these ``digits`` (written with a leading "+"
    or not); empty when it cannot be a number in any of them."""
    n_digits = len(digits)
    if plus:
        return PHONE_REGIONS[:1]
    if digits.startswith("00"):
        return ("GB",)  # "00" is the international prefix there (and in DE, FR, IN)
    if digits.startswith("0"):
        # National numbers with the trunk "0", by their lengths in each region, so a long
        # zero-led run doesn't spend four parses per stretch.
        return tuple(r for r, (lo, hi) in _TRUNK_ZERO_LENGTHS.items() if lo <= n_digits <= hi)
    regions = []
    # NANP (NXX-NXX-XXXX): ten digits, area code and exchange never starting with 0/1, or the
    # same after a leading "1". Checked here because phonenumbers takes ~0.1 ms to say no.
    national = digits[1:] if n_digits == 11 and digits[0] == "1" else digits
    if len(national) == 10 and national[0] in "23456789" and national[3] in "23456789":
        regions.append("US")
    # India without the trunk "0": ten-digit mobiles (6-9…), or "91" + a mobile. Indian
    # landlines are written with their "0", and "123-456-7890" is not anyone's mobile.
    if (n_digits == 10 and digits[0] in "6789") or (n_digits == 12 and digits.startswith("91")):
        regions.append("IN")
    return tuple(regions)


class _OutOfBudget(Exception):
    pass


class _PhoneScan:
    """Phone spans in one text, spending at most ``_PHONE_BUDGET`` on phonenumbers."""

    def __init__(self, text: str, candidates: list[tuple[int, int, int]]) -> None:
        self.text = text
        self.candidates = candidates
        self.budget = _PHONE_BUDGET
        self.stretches = _MAX_STRETCHES
        self.spans: list[tuple[int, int]] = []

    def run(self) -> list[tuple[int, int]]:
        exhausted = False
        for start, end, n_digits in self.candidates:
            raw = self.text[start:end]
            if _is_counting(raw) or _is_reference(self.text, start):
                continue
            regions = _regions_for(raw, n_digits)
            long_run = n_digits > _MAX_NATIONAL_DIGITS
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
                    # Several numbers, or one plus more digits: "415 555 2671 020 7946 0958",
                    # "I'm 27, 415 555 2671".
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
        window = _ODD_SEPARATORS.sub("-", self.text[lo:hi])
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
        found = list(_DIGIT_RUN.finditer(raw))
        groups = [(offset + g.start(), offset + g.end()) for g in found]
        digits = "".join(g.group() for g in found)
        first_digit = [0]  # index in ``digits`` of each group's first digit
        for g in found:
            first_digit.append(first_digit[-1] + g.end() - g.start())
        plus = raw.startswith("+")
        i = 0
        while i < len(groups):
            # A leading "+" belongs to the first group only.
            start = groups[i][0] - (1 if i == 0 and plus else 0)
            stretches, total = [], 0
            for j in range(i, len(groups)):
                total += groups[j][1] - groups[j][0]
                if total > _MAX_NUMBER_DIGITS:
                    break
                if total >= _MIN_PHONE_DIGITS:
                    stretches.append((j, total))
            i += 1
            for j, _total in reversed(stretches):
                # Each stretch costs Python work even when no region fits: bounded too.
                self.stretches -= 1
                if self.stretches < 0:
                    raise _OutOfBudget
                number = digits[first_digit[i - 1] : first_digit[j + 1]]
                regions = _regions_for_digits(number, plus=i == 1 and plus)
                if not regions:
                    continue
                sub = self.text[start : groups[j][1]]
                if not _is_counting(sub) and self._parses(sub, regions):
                    self.spans.append((start, groups[j][1]))
                    i = j + 1
                    break

    def _parses(self, sub: str, regions: tuple[str, ...]) -> bool:
        for region in regions:
            self._spend(1)
            try:
                number = phonenumbers.parse(_ODD_SEPARATORS.sub("-", sub), region)
                if phonenumbers.is_valid_number(number):
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


def find_pii_in(folded: Folded) -> list[tuple[int, int]]:
    """Sorted, non-overlapping spans of PII in ``folded.original`` (code point offsets)."""
    text = folded.text
    spans: list[tuple[int, int]] = []
    # Every address has a dot (".", "(dot)" or " dot "): " at " in a line without one is not
    # worth the address pattern (issue 10, proposal 6).
    if ("." in text or "dot" in text) and _EMAIL_HINT.search(text):
        spans += _email_spans(text)
    # Cheap gate: most messages have too few digits to hold a phone or card number, and
    # phonenumbers is by far the most expensive step. Most have none at all: one search for a
    # digit is a third of the count's ten passes (callgrind: 5.7 k against 15.9 k instructions
    # on the bench's 89-character line).
    if _ASCII_DIGIT.search(text) is not None and _digit_count(text) >= _GATE_DIGITS:
        view = _phone_view(text)
        candidates = _candidates(view)
        if candidates:
            spans += _PhoneScan(view, candidates).run()
            spans += _card_spans(view, candidates)
    return _merge([folded.span_in_original(s, e) for s, e in spans if e > s])


def find_pii(text: str) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ``(start, end)`` spans of PII in ``text`` (code point offsets)."""
    return find_pii_in(fold(text))


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
