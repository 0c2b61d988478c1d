"""What a connection needs from the rest of the server, in one bundle."""
from __future__ import annotations

import attrs

from winkr.actor import Frames
from winkr.auth import TokenVerifier
from winkr.config import Settings
from winkr.hub import HubHandle
from winkr.policy import PolicySettings
from winkr.presence import PresenceHandle
from winkr.ratelimit import RateLimiterHandle
from winkr.reaper import ReaperHandle
from winkr.store.writer import StoreHandle
from winkr.webhooks import WEBHOOKS_OFF, WebhookHandle


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
    limiter: RateLimiterHandle
    webhooks: WebhookHandle = WEBHOOKS_OFF  # enabled event types for enqueue; nudge after commit
