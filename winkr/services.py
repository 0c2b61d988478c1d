"""What a connection (and its handlers) may use from the rest of the server, in one bundle."""
from __future__ import annotations

import attrs

from winkr.actor import Frames
from winkr.auth import TokenVerifier
from winkr.config import Settings
from winkr.hub import HubHandle
from winkr.policy import PolicySettings
from winkr.presence import PresenceHandle
from winkr.ratelimit import Limiter, Rate
from winkr.reaper import ReaperHandle
from winkr.revocations import RevocationsHandle
from winkr.store.readers import ReaderHandle
from winkr.store.writer import StoreHandle
from winkr.webhooks import WebhookHandle


@attrs.frozen
class Services:
    settings: Settings
    frames: Frames
    verifier: TokenVerifier
    policy: PolicySettings
    store: StoreHandle
    presence: PresenceHandle
    hub: HubHandle
    reaper: ReaperHandle
    limiter: Limiter  # in-process (one node) or Redis (winkr.redis_limiter)
    message_rates: tuple[Rate, ...]  # the message windows switched on (counted by the store)
    webhooks: WebhookHandle  # enabled event types for enqueue; nudge after a commit that enqueued
    revocations: RevocationsHandle
    readers: ReaderHandle  # pure reads beside the writer (winkr.store.readers)
