"""The policy's pre-checks (issue 10) never change a verdict: when they let a line skip the
costly matchers, those matchers would have found nothing in it. Properties over generated
lines built from what the matchers react to (blocked words and their evasions: look-alikes,
separators, wildcards, repeats, endings; "@", " at ", dots), with the shipped block list and
with generated ones."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from winkr.policy import default_blocked_words
from winkr.policy.content_filter import _LOOKALIKES, SUFFIXES, compile_block_list, find_blocked
from winkr.policy.normalize import fold
from winkr.policy.pii import _email_spans, find_pii

EXAMPLES = 3000
_EVASION_CHARS = "".join(sorted(set("".join(_LOOKALIKES.values())))) + "*._-#!$@ "


@st.composite
def _evaded(draw: st.DrawFn, words: tuple[str, ...]) -> str:
    """A listed word as a sender might disguise it."""
    word = draw(st.sampled_from(words)).lstrip("=~")
    out = []
    for ch in word:
        choice = draw(st.integers(0, 9))
        if choice == 0 and ch in _LOOKALIKES:
            out.append(draw(st.sampled_from(_LOOKALIKES[ch])))
        elif choice == 1:
            out.append(draw(st.sampled_from("*#_!$")))  # a wildcard or a symbol
        elif choice == 2:
            out.append(ch + draw(st.sampled_from(".-_*")))  # a separator after it
        elif choice == 3:
            out.append(ch * draw(st.integers(2, 4)))
        elif choice == 4:
            continue  # a letter left out
        else:
            out.append(ch.upper() if choice == 5 else ch)
    if draw(st.booleans()):
        out.append(draw(st.sampled_from(SUFFIXES)))
    return "".join(out)


def _lines(words: tuple[str, ...]) -> st.SearchStrategy[str]:
    piece = st.one_of(
        _evaded(words),
        st.text(alphabet=_EVASION_CHARS + "abcdefghijklmnopqrstuvwxyz0123456789", max_size=6),
        st.sampled_from([" ", " at ", "@", ".", " dot ", "(dot)", "(at)", "ok", "haha", "😂", "ｓｈｉｔ", "ѕһіт"]),
        st.text(max_size=4),
    )
    return st.lists(piece, max_size=8).map("".join)


_WORD_LISTS = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=8).map(
        lambda w: w),
    min_size=1, max_size=5,
).flatmap(lambda ws: st.lists(st.sampled_from(["", "="]), min_size=len(ws), max_size=len(ws)).map(
    lambda prefixes: tuple(p + w for p, w in zip(prefixes, ws))))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
@given(line=_lines(default_blocked_words()))
def test_a_line_the_block_list_precheck_skips_has_nothing_the_pattern_finds(line: str) -> None:
    block_list = compile_block_list(default_blocked_words())
    assert block_list is not None
    text = fold(line).text
    if not block_list.may_match(text):
        assert block_list.pattern.search(text) is None, line
        assert find_blocked(fold(line), default_blocked_words()) == []


@settings(max_examples=EXAMPLES // 3, deadline=None, derandomize=True, database=None)  # compiles a list each
@given(data=st.data(), words=_WORD_LISTS)
def test_the_precheck_is_sound_for_any_block_list(data: st.DataObject, words: tuple[str, ...]) -> None:
    block_list = compile_block_list(words)
    assert block_list is not None
    line = data.draw(_lines(words))
    text = fold(line).text
    if not block_list.may_match(text):
        assert block_list.pattern.search(text) is None, (words, line)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
@given(line=_lines(("jane", "gmail", "com", "example", "org", "io")))
def test_a_line_without_a_dot_holds_no_address(line: str) -> None:
    text = fold(line).text
    if "." not in text and "dot" not in text:
        assert _email_spans(text) == [], line
        assert find_pii(line) == [] or any(ch.isdigit() for ch in text)  # phones/cards need digits


def test_the_prechecks_let_plain_short_lines_skip_and_keep_catching_evasions() -> None:
    block_list = compile_block_list(default_blocked_words())
    assert block_list is not None
    for skipped in ("ok", "haha ok 😂", "!#$%,;=?^~" + "x" * 64):
        assert not block_list.may_match(fold(skipped).text), skipped
    for caught in ("sh!t", "f*ck", "wh*re", "whoring", "@$$", "ｓｈｉｔ", "fuuuck"):
        assert block_list.may_match(fold(caught).text), caught
        assert find_blocked(fold(caught), default_blocked_words()), caught
