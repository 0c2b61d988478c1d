"""JWT verification with the algorithm pinned, and where a handshake carries its token.

pyjwt checks the signature and the claims' shape; ``exp`` is checked here against the
injected wall clock, so MockClock tests can let a token expire.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import jwt

from winkr.config import Settings
from winkr.errors import UNAUTHORIZED, ProtocolError

SUBPROTOCOL = "winkr.v1"
BEARER_PREFIX = "bearer."
MAX_SUB_CHARS = 64


@attrs.frozen
class Principal:
    """Who is on the other end of a connection, as the token says."""

    user_id: str
    username: str
    avatar_url: str | None
    is_service: bool
    expires_at: float  # wall-clock seconds
    issued_at: float | None = None  # the token's ``iat`` (wall-clock seconds), if it has one


def _read_key(value: str) -> str:
    """A PEM given inline or as a path to a file."""
    if "-----BEGIN" in value:
        return value
    return Path(value).read_text()


class TokenVerifier:
    """Verifies tokens for one configured algorithm and key; nothing else is accepted."""

    def __init__(self, settings: Settings, secret: str | None) -> None:
        self.algorithm = settings.jwt_algorithm
        if self.algorithm == "HS256":
            if not secret:
                raise ValueError("HS256 needs a secret")
            self._key: Any = secret.encode()
        else:
            self._key = _read_key(settings.jwt_public_key or "")
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience

    def verify(self, token: str, now: float) -> Principal:
        """Return the principal or raise ``ProtocolError(UNAUTHORIZED)``."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["sub", "exp"], "verify_exp": False,
                         "verify_aud": self._audience is not None,
                         "verify_iss": self._issuer is not None},
            )
        except jwt.PyJWTError as exc:
            raise ProtocolError(UNAUTHORIZED, f"invalid token: {exc}") from None
        sub, exp = claims.get("sub"), claims.get("exp")
        if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUB_CHARS:
            raise ProtocolError(UNAUTHORIZED, "invalid token: sub must be a string of 1-64 characters")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise ProtocolError(UNAUTHORIZED, "invalid token: exp must be a number")
        if exp <= now:
            raise ProtocolError(UNAUTHORIZED, "token has expired")
        username = claims.get("username")
        avatar = claims.get("avatar_url")
        iat = claims.get("iat")
        return Principal(
            user_id=sub,
            username=username if isinstance(username, str) else sub,
            avatar_url=avatar if isinstance(avatar, str) else None,
            is_service=claims.get("role") == "service",
            expires_at=float(exp),
            issued_at=float(iat) if isinstance(iat, (int, float)) and not isinstance(iat, bool) else None,
        )


def mint_token(settings: Settings, secret: str | None, user_id: str, *, ttl: float, now: float,
               username: str | None = None, avatar_url: str | None = None,
               service: bool = False) -> str:
    """Sign a token the server will accept (HS256 secret, or the configured private key)."""
    claims: dict[str, Any] = {"sub": user_id, "iat": int(now), "exp": int(now + ttl)}
    if username:
        claims["username"] = username
    if avatar_url:
        claims["avatar_url"] = avatar_url
    if service:
        claims["role"] = "service"
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_algorithm == "HS256":
        key: Any = (secret or "").encode()
    else:
        if not settings.jwt_private_key:
            raise ValueError(f"{settings.jwt_algorithm} tokens need jwt_private_key to be signed here")
        key = _read_key(settings.jwt_private_key)
    return jwt.encode(claims, key, algorithm=settings.jwt_algorithm)


def load_or_create_secret(settings: Settings) -> tuple[str, bool]:
    """The configured HMAC secret, or one generated once and kept beside the database
    (mode 0600). Returns ``(secret, created)``."""
    if settings.jwt_secret:
        return settings.jwt_secret, False
    path = settings.secret_path
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    with open(path, "x", opener=lambda p, flags: __import__("os").open(p, flags, 0o600)) as f:
        f.write(secret + "\n")
    return secret, True


@attrs.frozen
class HandshakeToken:
    token: str | None
    subprotocol: str | None  # what to select in the 101 answer


def token_from_handshake(headers: list[tuple[bytes, bytes]], path: str,
                         subprotocols: tuple[str, ...]) -> HandshakeToken:
    """The header wins, then the ``bearer.<jwt>`` subprotocol, then ``?token=``."""
    selected = SUBPROTOCOL if SUBPROTOCOL in subprotocols else None
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return HandshakeToken(token.strip(), selected)
            return HandshakeToken(None, selected)
    for proposed in subprotocols:
        if proposed.startswith(BEARER_PREFIX) and len(proposed) > len(BEARER_PREFIX):
            return HandshakeToken(proposed[len(BEARER_PREFIX):], selected)
    tokens = parse_qs(urlsplit(path).query).get("token")
    return HandshakeToken(tokens[0] if tokens else None, selected)
