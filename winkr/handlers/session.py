"""What a connection loads when it opens: one store request for everything presence and the
client need to know about the user (contract §7, §12)."""
from __future__ import annotations

import attrs

from winkr.auth import Principal
from winkr.records import UserSettings
from winkr.revocations import is_revoked
from winkr.store.store import Store


@attrs.frozen
class Session:
    contacts: set[str]  # who hears of this user's presence
    settings: UserSettings  # for connection:established and presence
    apart: set[str]  # users blocked either way
    revoked: bool  # the token was revoked after the handshake checked it (a race): close 4004


def open_session(store: Store, principal: Principal) -> Session:
    """Store work: record the user (name, avatar) and load their session."""
    user_id = principal.user_id
    store.upsert_user(user_id, principal.username, principal.avatar_url)
    return Session(store.contacts(user_id), store.user_settings(user_id), store.blocked_either_way(user_id),
                   is_revoked(store.revoked_at(user_id), principal))
