"""winkr.protocol.codec.with_ref: a frame encoded without a ref, given one, is the text
``encode`` makes with it (the room encodes a message once for the ack and the broadcast)."""
from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from winkr.protocol.codec import encode, with_ref

# orjson refuses unpaired surrogates (a client's ref can carry none: orjson read the envelope)
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=64)
_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=8)


@given(data=st.dictionaries(_text, _json, max_size=4), ref=st.none() | _text)
def test_with_ref_is_encode_with_the_ref(data: dict[str, Any], ref: str | None) -> None:
    stamp = "2026-01-01T00:00:00.000Z"
    assert with_ref(encode("message:new", data, stamp), ref) == encode("message:new", data, stamp, ref)
