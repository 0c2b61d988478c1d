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
from winkr.ids import user_id_problem

SUBPROTOCOL = "winkr.v1"
BEARER_PREFIX = "bearer."
MAX_USERNAME_CHARS = 100
MAX_AVATAR_URL_CHARS = 2048
MAX_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z: the last time an RFC 3339 timestamp can show


@attrs.frozen
class Principal:
    """Who is on the other end of a connection, as the token says."""

    user_id: str
    username: str
    avatar_url: str | None
    is_service: bool
    expires_at: float  # wall-clock seconds
    issued_at: float | None = None  # the token's iat, when it has one (revocations compare it)


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
                         "verify_iss": self._issuer is not None, "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise ProtocolError(UNAUTHORIZED, f"invalid token: {exc}") from None
        return principal_from_claims(claims, now)


def _invalid(reason: str) -> ProtocolError:
    return ProtocolError(UNAUTHORIZED, f"invalid token: {reason}")


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim: a finite number of seconds within years 1970-9999 (JSON decoders
    accept NaN and Infinity; neither is a time)."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_NUMERIC_DATE:
        raise _invalid(f"{name} must be a time in seconds since 1970 (at most year 9999)")
    return float(value)


def _text_claim(claims: dict[str, Any], name: str, max_chars: int) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_chars or not value.isprintable():
        raise _invalid(f"{name} must be printable text of 1-{max_chars} characters")
    return value


def principal_from_claims(claims: dict[str, Any], now: float) -> Principal:
    """Every claim checked before anything is accepted: a token that would break a frame later
    (a lone surrogate in a name, an ``exp`` of NaN or 10^17) is refused here, with 401."""
    sub = claims.get("sub")
    problem = user_id_problem(sub)
    if problem is not None or not isinstance(sub, str):
        raise _invalid(f"sub {problem}")
    exp = _time_claim(claims, "exp")
    if exp is None:
        raise _invalid("exp is required")
    issued_at = _time_claim(claims, "iat")
    username = _text_claim(claims, "username", MAX_USERNAME_CHARS)
    avatar_url = _text_claim(claims, "avatar_url", MAX_AVATAR_URL_CHARS)
    if avatar_url is not None and (urlsplit(avatar_url).scheme not in ("https", "http")
                                   or not urlsplit(avatar_url).hostname or " " in avatar_url):
        raise _invalid("avatar_url must be an http(s) URL")
    role = claims.get("role")
    if role is not None and not isinstance(role, str):
        raise _invalid("role must be a string")
    if exp <= now:
        raise ProtocolError(UNAUTHORIZED, "token has expired")
    return Principal(user_id=sub, username=username or sub, avatar_url=avatar_url, is_service=role == "service",
                     expires_at=exp, issued_at=issued_at)


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
