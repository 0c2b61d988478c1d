"""Client requests as attrs values, structured from ``data`` by one strict cattrs converter.

Validation belongs at the edge: a request that comes out of :func:`structure_request` has
the right types and bounds; handlers never re-check them. Every failure names the field.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NewType, TypeGuard, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from winkr.errors import VALIDATION_ERROR, ProtocolError
from winkr.ids import MAX_ID_CHARS, MAX_SEQ_DIGITS, user_id_problem

Id = NewType("Id", str)
"""A conversation id (or any opaque id): a printable string of 1–64 characters."""
UserId = NewType("UserId", str)
"""A user id: see ``winkr.ids.user_id_problem``."""
MessageId = NewType("MessageId", str)
"""``<conversation_id>.<seq>``; whether it names a message is the store's question (NOT_FOUND)."""

MAX_HISTORY_LIMIT = 100
MAX_MESSAGE_ID_CHARS = MAX_ID_CHARS + 1 + MAX_SEQ_DIGITS


@attrs.frozen
class MessageSend:
    conversation_id: Id
    type: Any
    content: Any = None
    metadata: Any = None
    client_message_id: Id | None = None


@attrs.frozen
class MessageRef:
    """``message:read`` and ``message:delete``."""

    conversation_id: Id
    message_id: MessageId


@attrs.frozen
class ConversationRef:
    """``typing:*``, ``conversation:join`` and ``conversation:leave``."""

    conversation_id: Id


@attrs.frozen
class ConversationCreate:
    participant_ids: list[UserId]


@attrs.frozen
class Empty:
    pass


@attrs.frozen
class MessageHistory:
    conversation_id: Id
    before_seq: int | None = None
    after_seq: int | None = None
    limit: int = 50


@attrs.frozen
class UserStatus:
    status: str


@attrs.frozen
class AuthRefresh:
    token: str


@attrs.frozen
class UserRef:
    """``user:block`` and ``user:unblock``; the server API's ``POST /v1/users/{id}/blocks``."""

    user_id: UserId


@attrs.frozen
class MessageReport:
    conversation_id: Id
    message_id: MessageId
    reason: str
    note: str | None = None
    plaintext: str | None = None


@attrs.frozen
class SettingsUpdate:
    """``user:settings``: the settings given change, the others stay."""

    read_receipts: bool | None = None
    online_status: bool | None = None


ClientRequest = (MessageSend | MessageRef | ConversationRef | ConversationCreate | Empty | MessageHistory
                 | UserStatus | AuthRefresh | UserRef | MessageReport | SettingsUpdate)
"""Every request a client can send (the closed union the handlers receive)."""


@attrs.frozen
class ApiSystemMessage:
    """The body of ``POST /v1/conversations/{id}/messages``."""

    content: Any = None
    metadata: Any = None
    client_message_id: Id | None = None
    type: Any = "system"


@attrs.frozen
class ApiDisconnect:
    """The body of ``POST /v1/users/{id}/disconnect``."""

    revoke_tokens: bool = False


ApiRequest = ApiSystemMessage | ApiDisconnect
"""Bodies only the server API takes (it also takes ``ConversationCreate`` and ``UserRef``)."""

STATUSES = ("online", "away", "busy", "offline")
REPORT_REASONS = ("spam", "scam", "harassment", "inappropriate", "underage", "other")


class _FieldError(ValueError):
    """Raised by the strict hooks; cattrs attaches the attribute path around it."""

    def __init__(self, reason: str, *subpath: str) -> None:
        super().__init__(reason)
        self.subpath = subpath


def _strict(kind: type, check: Callable[[Any], bool], what: str) -> Callable[[Any, Any], Any]:
    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or not check(value):
            raise _FieldError(what)
        return value
    return hook


converter = cattrs.Converter(detailed_validation=True)
converter.register_structure_hook(
    Id, _strict(str, lambda v: 0 < len(v) <= MAX_ID_CHARS and v.isprintable(),
                f"must be a printable string of 1-{MAX_ID_CHARS} characters"))
converter.register_structure_hook(
    MessageId, _strict(str, lambda v: 0 < len(v) <= MAX_MESSAGE_ID_CHARS and v.isprintable(),
                       f"must be a message id (a printable string of 1-{MAX_MESSAGE_ID_CHARS} characters)"))


def _structure_user_id(value: Any, _: Any) -> UserId:
    problem = user_id_problem(value)
    if problem is not None:
        raise _FieldError(problem)
    return UserId(value)


converter.register_structure_hook(UserId, _structure_user_id)
converter.register_structure_hook(str, _strict(str, lambda v: True, "must be a string"))
converter.register_structure_hook(bool, _strict(bool, lambda v: True, "must be true or false"))
converter.register_structure_hook(
    int, _strict(int, lambda v: -(2**63) <= v < 2**63, "must be an integer"))
converter.register_structure_hook(
    float, _strict((int, float), lambda v: math.isfinite(v), "must be a number"))  # type: ignore[arg-type]
converter.register_structure_hook(Any, lambda v, _: v)


def _structure_user_id_list(value: Any, _: Any) -> list[UserId]:
    if not isinstance(value, list):
        raise _FieldError("must be a list of user ids")
    for index, item in enumerate(value):
        problem = user_id_problem(item)
        if problem is not None:
            raise _FieldError(problem, str(index))
    return list(value)


converter.register_structure_hook_func(lambda t: t == list[UserId], _structure_user_id_list)


def _first_error(exc: BaseException, path: list[str]) -> tuple[str, str]:
    """Walk a cattrs exception tree to the first leaf: (dotted field path, reason)."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        for inner, note in exc.group_exceptions()[0]:
            step = getattr(note, "name", None)
            if step is None:
                step = str(getattr(note, "index", ""))
            return _first_error(inner, [*path, str(step)])
    if isinstance(exc, ForbiddenExtraKeysError):
        return ".".join(path), "unexpected field"
    if isinstance(exc, KeyError):
        return ".".join(path), "is required"
    if isinstance(exc, _FieldError):
        return ".".join([*path, *exc.subpath]), str(exc)
    return ".".join(path), "has the wrong type"


R = TypeVar("R", bound=ClientRequest | ApiRequest)


def structure_request(kind: type[R], data: dict[str, Any]) -> R:
    """The request value of type ``kind`` read from ``data``; raises ``ProtocolError``
    (``VALIDATION_ERROR``) naming the bad field."""
    if kind is MessageSend:
        send = _message_send(data)
        if send is not None:
            return send  # type: ignore[return-value]  # kind is MessageSend
    try:
        request = converter.structure(data, kind)
    except (ClassValidationError, IterableValidationError) as exc:
        field, reason = _first_error(exc, [])
        raise ProtocolError(VALIDATION_ERROR, f"{field} {reason}", field=field) from None
    _check_bounds(request)
    return request


def _valid_id(value: Any) -> TypeGuard[Id]:
    return type(value) is str and 0 < len(value) <= MAX_ID_CHARS and value.isprintable()


def _message_send(data: dict[str, Any]) -> MessageSend | None:
    """A valid ``message:send`` read directly, as the converter would read it (the request of
    every message: the converter's per-field hooks and error bookkeeping cost more than the
    checks); ``None`` when anything is off, for the converter to name the field."""
    conversation_id, client_message_id = data.get("conversation_id"), data.get("client_message_id")
    if not _valid_id(conversation_id) or "type" not in data or not (
            client_message_id is None or _valid_id(client_message_id)):
        return None
    return MessageSend(conversation_id, data["type"], data.get("content"), data.get("metadata"),
                       client_message_id)


def _check_bounds(request: ClientRequest | ApiRequest) -> None:
    if isinstance(request, MessageHistory):
        if not 1 <= request.limit <= MAX_HISTORY_LIMIT:
            raise ProtocolError(VALIDATION_ERROR, f"limit must be between 1 and {MAX_HISTORY_LIMIT}",
                                field="limit")
        for name in ("before_seq", "after_seq"):
            value = getattr(request, name)
            if value is not None and value < 0:
                raise ProtocolError(VALIDATION_ERROR, f"{name} must be >= 0", field=name)
    elif isinstance(request, UserStatus) and request.status not in STATUSES:
        raise ProtocolError(VALIDATION_ERROR, "status must be one of " + ", ".join(STATUSES),
                            field="status")
    elif isinstance(request, MessageReport) and request.reason not in REPORT_REASONS:
        raise ProtocolError(VALIDATION_ERROR, "reason must be one of " + ", ".join(REPORT_REASONS),
                            field="reason")
    elif isinstance(request, ConversationCreate) and not request.participant_ids:
        raise ProtocolError(VALIDATION_ERROR, "participant_ids must name at least one other user",
                            field="participant_ids")
