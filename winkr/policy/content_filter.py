"""Block-list masking: whole words with their inflections, tolerant of evasions.

Matching runs on the folded text (:mod:`winkr.policy.normalize`), so case, full-width and
mathematical letters (``ｓｈｉｔ``), Cyrillic/Greek look-alikes (``ѕһіт``), accents and
invisible characters inside a word (``f\\u200buck``) are already gone. On top of that a
blocked word matches when it stands alone (no letter or digit glued to either side) even if
the sender

- repeats letters (``fuuuck``, ``shiiit``),
- puts punctuation between the letters (``s.h.i.t``, ``f_u_c_k``, ``s*h*i*t``),
- swaps in a look-alike symbol or digit (``@ss``, ``$hit``, ``sh!t``, ``sh1t``, ``fvck``);
  digits only count when the word keeps at least two real letters, so ``455`` or a phone
  model ``A55`` is never ``ass``,
- hides one inner letter behind a symbol (``f*ck``, ``sh#t``, ``b!tch``); the word must keep
  three real letters, so ``f**k`` (already self-censored) and ``a*s`` stay,
- inflects it: every list entry also matches with the English endings in :data:`SUFFIXES`
  (``fucks``, ``fucked``, ``fucking``, ``fucker``, ``shitty``, ``assholes``), a final ``e``
  dropped before a vowel ending (``whoring``).

Spaces are *not* bridged, so ``s h i t`` stays, and words that merely contain a blocked
word (``class``, ``Scunthorpe``, ``cocktail``, ``assume``) are never touched.

List syntax (``blocked_words.txt`` and ``WINKR_BLOCKED_WORDS``), one entry per line/item:

- ``word`` — blocked, with its inflections;
- ``=word`` — blocked only as written (no inflections: ``=spic`` must not block ``spicy``);
- ``~word or phrase`` — an exception: a match inside it is left alone (``~twatt``, a place;
  ``~spic span``). Between the words of an exception any punctuation and the connectors
  ``and``/``n`` are allowed, so ``~spic span`` also covers ``spic and span``, ``Spic 'n'
  Span`` and ``spic-and-span``. Exceptions are matched as written, without evasions.
"""
from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Iterable
from itertools import groupby

import attrs

from winkr.policy.normalize import Folded, fold

__all__ = [
    "SUFFIXES",
    "BlockList",
    "compile_block_list",
    "default_blocked_words",
    "find_blocked",
    "mask_blocked",
    "mask_spans",
    "parse_word_list",
]

# English inflections and the compounds insults are built with. Each is tried after every
# entry without "=" (longest first, all tolerant of the same evasions as the word itself).
SUFFIXES: tuple[str, ...] = (
    "s", "es", "ed", "d", "er", "ers", "ing", "ings", "in", "y", "ier", "iest", "ies", "ish",
    "head", "heads", "face", "faces", "hole", "holes", "bag", "bags", "wit", "wits",
    "show", "shows", "storm", "storms", "load", "loads",
)
_VOWEL_SUFFIXES = tuple(s for s in SUFFIXES if s[0] in "aeiouy")

# Punctuation or underscore (never whitespace, never a letter/digit) may sit between letters;
# capped at three so the pattern can't wander across a whole line of symbols. A separator is
# never a look-alike of the letter after it, or "a$$hole" would spend "$" as a separator.
_SEP_CHAR = r"(?:[^\w\s]|_)"
# One symbol standing in for one letter ("f*ck").
_WILD = r"(?:[^\w\s]|_)"
# Look-alikes of a letter in folded (lowercase) text ("l" for "i": "SHlT" reads as "SHIT").
# Digits are verified afterwards (see
# _acceptable): on their own they would turn room numbers like "455" into "ass".
_LOOKALIKES: dict[str, str] = {
    "a": "@4", "b": "8", "e": "3", "g": "9", "i": "!1|l", "l": "1|", "o": "0", "s": "$5",
    "t": "7+", "u": "v",
}
# "Glued to a letter or digit" means not a whole word; underscore counts as a separator.
# Checked after the first character is consumed, hence two characters back.
_NOT_AFTER_ALNUM_2 = r"(?<![^\W_].)"
_NOT_BEFORE_ALNUM = r"(?![^\W_])"
_MIN_LETTERS_WITH_DIGITS = 2
_MIN_LETTERS_WITH_WILDCARD = 3
_ASCII_LETTERS = re.compile(r"[a-z]")
PRECHECK_MIN_CHARS = 24  # shorter lines go straight to the pattern (BlockList.may_match)
_DIGITS = re.compile(r"\d")


def parse_word_list(text: str) -> tuple[str, ...]:
    """Entries from a one-per-line list: stripped, lowercased, '#' comments and blanks skipped,
    duplicates dropped (first occurrence wins)."""
    words: dict[str, None] = {}
    for line in text.splitlines():
        word = line.split("#", 1)[0].strip().lower()
        if word:
            words[word] = None
    return tuple(words)


@functools.cache
def default_blocked_words() -> tuple[str, ...]:
    """The block list shipped with winkr (``blocked_words.txt``), lowercase, in file order."""
    # importlib.resources rather than a path next to __file__: works from a wheel or a .pyz.
    text = importlib.resources.files("winkr.policy").joinpath("blocked_words.txt").read_text(
        encoding="utf-8"
    )
    return parse_word_list(text)


def _char_class(ch: str) -> str:
    return "[" + re.escape(ch + _LOOKALIKES.get(ch, "")) + "]"


def _sep_then(cls: str) -> str:
    """Up to three separators, then one letter of class ``cls``, as one atomic piece."""
    return f"(?>(?:(?!{cls}){_SEP_CHAR}){{0,3}}{cls})"


def _piece(ch: str, count: int, repeat: bool = True) -> str:
    """``count`` (or, with ``repeat``, more) of letter ``ch``, each possibly preceded by
    separators ("s.s.s")."""
    if ch == " ":
        return r"(?:\s|[^\w\s]|_){1,3}+"
    if not ch.isalpha():
        return re.escape(ch) * count
    cls = _char_class(ch)
    # Each separator+letter piece is atomic and each repeat possessive: the next piece is a
    # different letter, so giving characters back never helps, and refusing to keeps the
    # cost per starting position bounded (no quadratic blow-up on "$$$$…", "s.s.s.…").
    return _sep_then(cls) + (f"{{{count},}}+" if repeat else f"{{{count}}}")


def _runs(word: str) -> list[tuple[str, int]]:
    return [(ch, len(list(run))) for ch, run in groupby(word)]


def _rest(word: str, wild_run: int | None = None) -> list[str]:
    """The pattern pieces for ``word`` after its first character has been consumed; with
    ``wild_run``, that (single-letter, inner) run is one symbol instead."""
    runs = _runs(word)
    first_ch, first_n = runs[0]
    cls = _char_class(first_ch)
    parts = [_sep_then(cls) + f"{{{first_n - 1},}}+"]
    for j, (ch, n) in enumerate(runs[1:], start=1):
        parts.append(_WILD if j == wild_run else _piece(ch, n))
    return parts


def _suffix_group(suffixes: Iterable[str], optional: bool) -> str:
    # A repeated "s" is not tolerated in endings: "ass" + "es" must not swallow "assess".
    ordered = sorted(suffixes, key=lambda s: (-len(s), s))
    trie = _trie_pattern([[_piece(ch, n, repeat=ch != "s") for ch, n in _runs(s)] for s in ordered])
    return f"(?:{trie})" + ("?" if optional else "")


@attrs.frozen
class _Entry:
    word: str
    inflected: bool

    def stems(self, wildcards: bool) -> list[list[str]]:
        """The entry's stem as lists of pieces (first character consumed): as written, and
        with each inner single letter hidden behind a symbol when ``wildcards``."""
        runs = _runs(self.word)
        stems = [_rest(self.word)]
        if wildcards and sum(n for _, n in runs) >= _MIN_LETTERS_WITH_WILDCARD + 1:
            stems += [
                _rest(self.word, j) for j in range(1, len(runs) - 1)
                if runs[j][1] == 1 and runs[j][0].isalpha()
            ]
        return stems

    def e_dropped(self) -> list[list[str]]:
        """The stem without its final "e", for the vowel endings ("whor" + "ing")."""
        if self.inflected and self.word.endswith("e") and len(self.word) > 2:
            return [_rest(self.word[:-1])]
        return []


_END = ""  # trie key marking "an alternative may end here"
_Trie = dict[str, "_Trie"]


def _trie_pattern(alternatives: list[list[str]]) -> str:
    """One regex for ``alternatives`` with shared leading pieces factored out, so a piece
    common to many words ("sh" of shit/shithead/...) is tried once per position. Order is
    kept: earlier (longer) alternatives are tried first, an ending last."""
    trie: _Trie = {}
    for pieces in alternatives:
        node = trie
        for piece in pieces:
            node = node.setdefault(piece, {})
        node.setdefault(_END, {})

    def emit(node: _Trie) -> str:
        branches = [piece + emit(child) for piece, child in node.items() if piece != _END]
        ends = _END in node
        if not branches:
            return ""
        if len(branches) == 1 and not ends:
            return branches[0]
        return "(?:" + "|".join(branches) + ("|)" if ends else ")")

    return emit(trie)


def _branch(entries: list[_Entry], wildcards: bool) -> str:
    """The alternatives for entries sharing a first letter (that letter consumed)."""
    inflected = [stem for e in entries if e.inflected for stem in e.stems(wildcards)]
    exact = [stem for e in entries if not e.inflected for stem in e.stems(wildcards)]
    e_dropped = [stem for e in entries for stem in e.e_dropped()]
    # Each ending group appears once per first letter, after a trie of all the stems, not
    # once per stem: the regex stays small (fast to compile) and backtracking into the
    # stem alternatives keeps "longest first".
    alternatives = []
    if inflected:
        alternatives.append(_trie_pattern(inflected) + _suffix_group(SUFFIXES, optional=True))
    if e_dropped:
        alternatives.append(_trie_pattern(e_dropped) + _suffix_group(_VOWEL_SUFFIXES, optional=False))
    if exact:
        alternatives.append(_trie_pattern(exact))
    return "(?:" + "|".join(alternatives) + ")"


def _compile(entries: list[_Entry], wildcards: bool) -> re.Pattern[str]:
    by_first: dict[str, list[_Entry]] = {}
    # Longest first so "motherfuck" is tried before "mother…" prefixes of other entries.
    for entry in sorted(entries, key=lambda e: (-len(e.word), e.word)):
        by_first.setdefault(entry.word[0], []).append(entry)
    first_chars = "".join(ch + _LOOKALIKES.get(ch, "") for ch in by_first)
    # Why this shape: a pattern that *starts* with a plain character class lets the regex
    # engine skip ahead in C to the next possible first letter, instead of trying every
    # alternative at every position. Then: the character before the first letter is not a
    # letter/digit (whole word); each branch re-checks which first letter it was consumed
    # for, and that the letter is not preceded by another form of itself (so "$$$$…" is
    # tried once, not at every "$").
    branches = "|".join(
        f"(?<={_char_class(ch)}){_not_after_same(ch)}{_branch(group, wildcards)}"
        for ch, group in by_first.items()
    )
    return re.compile(
        f"[{re.escape(''.join(dict.fromkeys(first_chars)))}]{_NOT_AFTER_ALNUM_2}"
        f"(?:{branches}){_NOT_BEFORE_ALNUM}"
    )


def _not_after_same(ch: str) -> str:
    """The first letter is not preceded by another form of itself, directly or across up to
    three separators ("$$$$", "s.s.s"): such a run is tried once, from its start."""
    cls = _char_class(ch)
    return "".join(f"(?<!{cls}{_WILD * k}.)" for k in range(4))


def _exception_pattern(phrases: list[str]) -> re.Pattern[str] | None:
    if not phrases:
        return None
    joiner = r"[\W_]+(?:(?:and|n)[\W_]+)?"
    alternatives = sorted(
        (joiner.join(map(re.escape, phrase.split())) for phrase in phrases),
        key=lambda p: -len(p),
    )
    return re.compile(f"(?<![^\\W_])(?:{'|'.join(alternatives)})(?![^\\W_])")


# The pre-check (issue 10, proposal 6): which letters each character can stand for in a
# match — the letter itself and its look-alikes — as bits of a mask, one bit per letter.
_LETTER_BITS: dict[str, int] = {}
for _index, _letter in enumerate("abcdefghijklmnopqrstuvwxyz"):
    for _ch in _letter + _LOOKALIKES.get(_letter, ""):
        _LETTER_BITS[_ch] = _LETTER_BITS.get(_ch, 0) | 1 << _index
_LETTER_ITEMS = tuple(_LETTER_BITS.items())


def _letter_bit(letter: str) -> int:
    """The bit of a letter (not of what a character may stand for: that is ``_LETTER_BITS``)."""
    return 1 << (ord(letter) - ord("a")) if "a" <= letter <= "z" else 0


def _letter_mask(letters: str) -> int:
    mask = 0
    for ch in letters:
        mask |= _letter_bit(ch)
    return mask


def _letters_needed(entry: _Entry) -> list[tuple[int, int]]:
    """What the matches of ``entry`` show, as masks of letters (each as itself or a
    look-alike): one (needed, hideable) pair per kind of match. The word (with its endings):
    every letter, but a wildcard may hide one the word has once, inside it, in words of four
    letters or more. The stem without its final "e" ("whor" + "ing"): every letter, no
    wildcard. A match of a kind shows its needed letters but at most one hideable one."""
    word = entry.word
    hideable = 0
    runs = _runs(word)
    if sum(n for _, n in runs) >= _MIN_LETTERS_WITH_WILDCARD + 1:
        for ch, n in runs[1:-1]:
            if n == 1 and word.count(ch) == 1:  # hidden here, shown nowhere else
                hideable |= _letter_bit(ch)
    kinds = [(_letter_mask(word), hideable)]
    if entry.e_dropped():
        kinds.append((_letter_mask(word[:-1]), 0))
    return kinds


@attrs.frozen
class BlockList:
    """A compiled block list: ``pattern`` finds candidates (wildcards allowed),
    ``exceptions`` the phrases never masked, ``needed`` the letters each entry's matches
    show, with those of them it cannot hide (:meth:`may_match`)."""

    entries: tuple[_Entry, ...]
    pattern: re.Pattern[str]
    exceptions: re.Pattern[str] | None
    needed: tuple[tuple[int, int], ...] = ()

    def may_match(self, text: str) -> bool:
        """False only when ``pattern`` cannot match anywhere in ``text`` (folded): for no
        entry are the letters a match shows (:func:`_letters_needed`) all in the text, as
        themselves or look-alikes. Costs a few µs where the pattern costs 10-30 µs; a long
        line has most letters and passes, a short one or one of symbols and digits mostly not."""
        present = 0
        for ch, bit in _LETTER_ITEMS:  # 39 substring tests cost less than set(text) and a lookup per character
            if ch in text:
                present |= bit
        absent = ~present  # (once, not per entry)
        # An entry may match when what it misses is nothing, or one letter it can hide: the
        # letters it cannot hide (``strict``) are all present, and at most one letter is
        # missing. The first test rejects most entries in one operation.
        for needed, strict in self.needed:
            if not strict & absent:
                missing = needed & absent
                if not missing & (missing - 1):
                    return True
        return False

    def acceptable(self, matched: str) -> bool:
        """Whether a candidate keeps enough real letters for its look-alikes/wildcard."""
        letters = len(_ASCII_LETTERS.findall(matched))
        if letters < _MIN_LETTERS_WITH_DIGITS and _DIGITS.search(matched):
            return False
        if letters < _MIN_LETTERS_WITH_WILDCARD and not _strict(self.entries).fullmatch(matched):
            return False  # it needed the wildcard, and too few real letters are left
        return True


@functools.lru_cache(maxsize=16)
def _strict(entries: tuple[_Entry, ...]) -> re.Pattern[str]:
    """The pattern without wildcards: compiled only when a short candidate needs telling
    whether it used one ("a*s" does not)."""
    return _compile(list(entries), wildcards=False)


@functools.lru_cache(maxsize=16)
def compile_block_list(words: tuple[str, ...]) -> BlockList | None:
    """The compiled list (cached per tuple); None when nothing is blocked."""
    entries: dict[str, _Entry] = {}
    exceptions: list[str] = []
    for raw in words:
        # Entries are folded like the text they are matched against ("ＦＲＡＫ" → "frak").
        item = fold(raw).text.strip()
        if item.startswith("~"):
            if item[1:].strip():
                exceptions.append(item[1:].strip())
        elif item.startswith("="):
            if item[1:].strip():
                entries.setdefault(item[1:].strip(), _Entry(item[1:].strip(), inflected=False))
        elif item:
            entries[item] = _Entry(item, inflected=True)
    if not entries:
        return None
    listed = tuple(entries.values())
    return BlockList(
        entries=listed,
        pattern=_compile(list(listed), wildcards=True),
        exceptions=_exception_pattern(exceptions),
        needed=tuple(sorted({(letters, letters & ~hideable) for entry in listed
                             for letters, hideable in _letters_needed(entry)},
                            key=lambda kind: kind[0].bit_count())),
    )


def find_blocked(folded: Folded, words: tuple[str, ...]) -> list[tuple[int, int]]:
    """Spans of blocked words in ``folded.original`` (code point offsets), in order."""
    block_list = compile_block_list(words)
    if block_list is None or not folded.text:
        return []
    # On a short line the pattern costs less than the pre-check (~0.5 µs against ~2 µs).
    if len(folded.text) >= PRECHECK_MIN_CHARS and not block_list.may_match(folded.text):
        return []
    text = folded.text
    found = [m.span() for m in block_list.pattern.finditer(text)
             if block_list.acceptable(m.group())]
    if found and block_list.exceptions is not None:
        allowed = [m.span() for m in block_list.exceptions.finditer(text)]
        found = [(s, e) for s, e in found if not any(a <= s and e <= b for a, b in allowed)]
    return [folded.span_in_original(s, e) for s, e in found]


def mask_spans(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """``text`` with every span replaced by ``*`` of the same length (spans may overlap)."""
    parts: list[str] = []
    pos = 0
    for s, e in sorted(spans):
        s = max(s, pos)
        if e > s:
            parts += [text[pos:s], "*" * (e - s)]
            pos = e
    parts.append(text[pos:])
    return "".join(parts)


def mask_blocked(text: str, words: tuple[str, ...]) -> tuple[str, bool]:
    """Replace every blocked word in ``text`` with ``*`` of the same length.

    Returns the masked text (always ``len(text)`` code points; only the masked spans differ
    from ``text``) and whether anything was masked. ``words`` must be a tuple so the
    compiled pattern can be cached.
    """
    spans = find_blocked(fold(text), words)
    if not spans:
        return text, False
    return mask_spans(text, spans), True
