"""Message policy: per-type validation, block-list filtering and PII masking (pure code)."""
from winkr.policy.content_filter import default_blocked_words, mask_blocked
from winkr.policy.message_types import (
    MESSAGE_TYPES,
    PII_POLICIES,
    CheckedMessage,
    PolicySettings,
    check_message,
)
from winkr.policy.pii import find_pii, mask_pii

__all__ = [
    "MESSAGE_TYPES",
    "PII_POLICIES",
    "CheckedMessage",
    "PolicySettings",
    "check_message",
    "default_blocked_words",
    "find_pii",
    "mask_blocked",
    "mask_pii",
]
