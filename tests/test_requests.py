"""winkr.protocol.requests: ``message:send`` is read by a direct path (the one request per
message); it must take exactly what the strict converter takes, and give the same request."""
from __future__ import annotations

from typing import Any

import cattrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from winkr.errors import ProtocolError
from winkr.protocol.requests import MessageSend, _message_send, converter, structure_request

_value = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70) | \
    st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
_id = st.text(max_size=66) | st.sampled_from(["c1", "x" * 64, "x" * 65, "", "a\nb", "a b", "é"])
_optional = {"content": _value, "metadata": _value, "client_message_id": _id | _value, "extra": _value}
_data = st.fixed_dictionaries({"conversation_id": st.sampled_from(["c1", "x" * 64]) | _id, "type": _value},
                              optional=_optional) | \
    st.fixed_dictionaries({}, optional={"conversation_id": _id | _value, "type": _value, **_optional})


@given(_data)
def test_the_direct_path_takes_what_the_converter_takes(data: dict[str, Any]) -> None:
    direct = _message_send(data)
    try:
        expected = converter.structure(data, MessageSend)
    except cattrs.BaseValidationError:
        assert direct is None
        return
    assert direct is None or direct == expected
    assert structure_request(MessageSend, data) == expected


@pytest.mark.parametrize(("data", "field"), [
    ({"type": "text"}, "conversation_id"),
    ({"conversation_id": "", "type": "text"}, "conversation_id"),
    ({"conversation_id": "c1"}, "type"),
    ({"conversation_id": "c1", "type": "text", "client_message_id": 7}, "client_message_id"),
    ({"conversation_id": "c1", "type": "text", "client_message_id": "x" * 65}, "client_message_id"),
])
def test_a_bad_send_still_names_its_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        structure_request(MessageSend, data)
    assert info.value.details["field"] == field
