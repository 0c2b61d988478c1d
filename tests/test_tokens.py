"""Tokens (contract §2, §11.9): the attack battery at the handshake for HS256, RS256 and
ES256 configurations, ``iss``/``aud`` when configured, expiry during a connection,
``auth:refresh``, and the Origin allow-list.

Everything runs the real server over in-memory streams under trio's MockClock (autojump).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
import trio
import trio.testing
from conftest import (
    SECRET,
    Client,
    Harness,
    assert_unauthorized,
    bearer,
    claims_for,
    error_body,
    iso,
    make_settings,
    refused,
    still_works,
    until_closed,
    welcomed,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

ISSUER, AUDIENCE = "winkr-test", "chat"


# --- keys --------------------------------------------------------------------------------

def _pem_private(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _pem_public(key: Any) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(scope="module")
def rsa_keys() -> dict[str, str]:
    """The server's RSA pair and an attacker's."""
    mine = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    theirs = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {"private": _pem_private(mine), "public": _pem_public(mine),
            "attacker_private": _pem_private(theirs), "attacker_public": _pem_public(theirs)}


@pytest.fixture(scope="module")
def ec_keys() -> dict[str, str]:
    mine = ec.generate_private_key(ec.SECP256R1())
    theirs = ec.generate_private_key(ec.SECP256R1())
    return {"private": _pem_private(mine), "public": _pem_public(mine),
            "attacker_private": _pem_private(theirs)}


# --- settings per test -----------------------------------------------------------------

@pytest.fixture
def settings(request: Any, tmp_path: Any, engine: Any, rsa_keys: dict[str, str], ec_keys: dict[str, str]) -> Any:
    """``parametrize("settings", ["rs256" | "es256" | "es256_key_file" | "iss_aud" |
    "origins"], indirect=True)``; the default configuration otherwise."""
    kind = getattr(request, "param", "hs256")
    if kind == "hs256":
        return make_settings(tmp_path)
    if kind == "rs256":
        return make_settings(tmp_path, jwt_algorithm="RS256", jwt_public_key=rsa_keys["public"],
                             jwt_private_key=rsa_keys["private"])
    if kind == "es256":
        return make_settings(tmp_path, jwt_algorithm="ES256", jwt_public_key=ec_keys["public"],
                             jwt_private_key=ec_keys["private"])
    if kind == "es256_key_file":
        public = tmp_path / "ec_public.pem"
        public.write_text(ec_keys["public"])
        return make_settings(tmp_path, jwt_algorithm="ES256", jwt_public_key=str(public),
                             jwt_private_key=ec_keys["private"])
    if kind == "iss_aud":
        return make_settings(tmp_path, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    if kind == "origins":
        return make_settings(tmp_path, allowed_origins=("https://app.winkr.test",))
    raise AssertionError(kind)


# --- helpers ---------------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hmac_token(claims: dict[str, Any], key: bytes, alg: str = "HS256") -> str:
    """An HMAC token by hand: pyjwt refuses to use a PEM as an HMAC secret, attackers don't."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384}[alg]
    signing_input = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + "." + _b64(json.dumps(claims).encode())
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return signing_input + "." + _b64(signature)


def unsigned(claims: dict[str, Any], alg: str = "none") -> str:
    """``alg: none`` (any spelling), no signature."""
    return _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + "." + _b64(json.dumps(claims).encode()) + "."


def tampered(token: str, **changes: Any) -> str:
    """A validly signed token whose payload was changed afterwards."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{_b64(json.dumps(claims).encode())}.{signature}"


async def assert_token_refused(harness: Harness, token: str) -> None:
    assert_unauthorized(await refused(harness, bearer(token)))


async def assert_accepted(harness: Harness, token: str, user_id: str = "alice",
                          headers: list[tuple[str, str]] | None = None) -> Client:
    client = await welcomed(await harness.open_ws(headers=bearer(token) + (headers or [])), user_id)
    await still_works(client)
    return client


# --- the battery: HS256 configured (the default) -----------------------------------------

HS256_ATTACKS = {
    "alg_none": lambda h, k: unsigned(claims_for(h)),
    "alg_None_capitalised": lambda h, k: unsigned(claims_for(h), alg="None"),
    "alg_none_with_secret_signature": lambda h, k: unsigned(claims_for(h)) + _b64(b"x" * 32),
    "rs256_token": lambda h, k: jwt.encode(claims_for(h), k["private"], algorithm="RS256"),
    "hs384_with_the_secret": lambda h, k: hmac_token(claims_for(h), SECRET.encode(), "HS384"),
    "signed_with_another_secret": lambda h, k: jwt.encode(
        claims_for(h), "another-secret-0123456789abcdef0123456789", algorithm="HS256"),
    "tampered_sub": lambda h, k: tampered(h.token("mallory"), sub="alice"),
    "tampered_exp": lambda h, k: tampered(h.token("alice", ttl=-10), exp=int(h.server.clock()) + 3600),
    "missing_sub": lambda h, k: jwt.encode(claims_for(h, sub=None), SECRET, algorithm="HS256"),
    "sub_not_a_string": lambda h, k: jwt.encode(claims_for(h, sub=42), SECRET, algorithm="HS256"),
    "missing_exp": lambda h, k: jwt.encode({"sub": "alice", "iat": int(h.server.clock())}, SECRET,
                                           algorithm="HS256"),
    "exp_not_a_number": lambda h, k: jwt.encode({"sub": "alice", "exp": "tomorrow"}, SECRET,
                                                algorithm="HS256"),
    "expired": lambda h, k: jwt.encode(claims_for(h, ttl=-1), SECRET, algorithm="HS256"),
    "expires_right_now": lambda h, k: jwt.encode(claims_for(h, ttl=0), SECRET, algorithm="HS256"),
    "not_a_jwt": lambda h, k: "not-a-jwt",
    "two_segments": lambda h, k: ".".join(h.token("alice").split(".")[:2]),
}


@pytest.mark.parametrize("attack", sorted(HS256_ATTACKS))
async def test_hs256_attack_battery_is_refused_401(autojump_clock: Any, harness: Harness,
                                                   rsa_keys: dict[str, str], attack: str) -> None:
    await assert_token_refused(harness, HS256_ATTACKS[attack](harness, rsa_keys))
    await assert_accepted(harness, harness.token("alice"))  # the good token still works


# --- the battery: RS256 configured -------------------------------------------------------

def _attacker_jwk(keys: dict[str, str]) -> dict[str, Any]:
    public = serialization.load_pem_public_key(keys["attacker_public"].encode())
    return json.loads(RSAAlgorithm.to_jwk(public))


RS256_ATTACKS = {
    "alg_none": lambda h, k: unsigned(claims_for(h)),
    "hs256_signed_with_the_public_key": lambda h, k: hmac_token(claims_for(h), k["public"].encode()),
    "hs256_signed_with_the_public_key_stripped": lambda h, k: hmac_token(
        claims_for(h), k["public"].strip().encode()),
    "hs256_signed_with_the_shared_secret": lambda h, k: hmac_token(claims_for(h), SECRET.encode()),
    "rs256_signed_by_another_key": lambda h, k: jwt.encode(claims_for(h), k["attacker_private"],
                                                           algorithm="RS256"),
    "rs256_another_key_with_embedded_jwk": lambda h, k: jwt.encode(
        claims_for(h), k["attacker_private"], algorithm="RS256", headers={"jwk": _attacker_jwk(k)}),
    "rs512_with_the_right_key": lambda h, k: jwt.encode(claims_for(h), k["private"], algorithm="RS512"),
    "ps256_with_the_right_key": lambda h, k: jwt.encode(claims_for(h), k["private"], algorithm="PS256"),
    "tampered_sub": lambda h, k: tampered(h.token("mallory"), sub="alice"),
    "missing_sub": lambda h, k: jwt.encode(claims_for(h, sub=None), k["private"], algorithm="RS256"),
    "missing_exp": lambda h, k: jwt.encode({"sub": "alice"}, k["private"], algorithm="RS256"),
    "expired": lambda h, k: jwt.encode(claims_for(h, ttl=-1), k["private"], algorithm="RS256"),
}


@pytest.mark.parametrize("settings", ["rs256"], indirect=True)
@pytest.mark.parametrize("attack", sorted(RS256_ATTACKS))
async def test_rs256_attack_battery_is_refused_401(autojump_clock: Any, harness: Harness,
                                                   rsa_keys: dict[str, str], attack: str) -> None:
    await assert_token_refused(harness, RS256_ATTACKS[attack](harness, rsa_keys))
    await assert_accepted(harness, harness.token("alice"))


@pytest.mark.parametrize("settings", ["rs256"], indirect=True)
async def test_rs256_token_with_the_configured_key_is_accepted(autojump_clock: Any, harness: Harness,
                                                               rsa_keys: dict[str, str]) -> None:
    token = jwt.encode(claims_for(harness, sub="bob", username="Bob"), rsa_keys["private"], algorithm="RS256")
    await assert_accepted(harness, token, "bob")


# --- ES256 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", ["es256", "es256_key_file"], indirect=True)
async def test_es256_with_a_configured_ec_public_key_works(autojump_clock: Any, harness: Harness,
                                                          ec_keys: dict[str, str]) -> None:
    await assert_accepted(harness, harness.token("alice"))
    token = jwt.encode(claims_for(harness, sub="bob"), ec_keys["private"], algorithm="ES256")
    await assert_accepted(harness, token, "bob")


ES256_ATTACKS = {
    "rs256_token": lambda h, r, e: jwt.encode(claims_for(h), r["private"], algorithm="RS256"),
    "hs256_signed_with_the_public_key": lambda h, r, e: hmac_token(claims_for(h), e["public"].encode()),
    "hs256_signed_with_the_shared_secret": lambda h, r, e: hmac_token(claims_for(h), SECRET.encode()),
    "es256_signed_by_another_key": lambda h, r, e: jwt.encode(claims_for(h), e["attacker_private"],
                                                              algorithm="ES256"),
    "alg_none": lambda h, r, e: unsigned(claims_for(h)),
    "expired": lambda h, r, e: jwt.encode(claims_for(h, ttl=-1), e["private"], algorithm="ES256"),
}


@pytest.mark.parametrize("settings", ["es256"], indirect=True)
@pytest.mark.parametrize("attack", sorted(ES256_ATTACKS))
async def test_es256_refuses_other_algorithms_and_keys(autojump_clock: Any, harness: Harness,
                                                       rsa_keys: dict[str, str], ec_keys: dict[str, str],
                                                       attack: str) -> None:
    await assert_token_refused(harness, ES256_ATTACKS[attack](harness, rsa_keys, ec_keys))


# --- iss and aud ---------------------------------------------------------------------------

ISS_AUD_REFUSED = {
    "wrong_iss": {"iss": "someone-else", "aud": AUDIENCE},
    "missing_iss": {"aud": AUDIENCE},
    "wrong_aud": {"iss": ISSUER, "aud": "admin"},
    "missing_aud": {"iss": ISSUER},
    "aud_list_without_ours": {"iss": ISSUER, "aud": ["admin", "billing"]},
    "both_missing": {},
}


@pytest.mark.parametrize("settings", ["iss_aud"], indirect=True)
@pytest.mark.parametrize("case", sorted(ISS_AUD_REFUSED))
async def test_iss_and_aud_are_checked_when_configured(autojump_clock: Any, harness: Harness,
                                                       case: str) -> None:
    token = jwt.encode(claims_for(harness, **ISS_AUD_REFUSED[case]), SECRET, algorithm="HS256")
    await assert_token_refused(harness, token)


@pytest.mark.parametrize("settings", ["iss_aud"], indirect=True)
@pytest.mark.parametrize("aud", [AUDIENCE, [AUDIENCE, "other"]], ids=["string", "list"])
async def test_right_iss_and_aud_are_accepted(autojump_clock: Any, harness: Harness, aud: Any) -> None:
    await assert_accepted(harness, harness.token("alice"))
    token = jwt.encode(claims_for(harness, sub="bob", iss=ISSUER, aud=aud), SECRET, algorithm="HS256")
    await assert_accepted(harness, token, "bob")


async def test_iss_and_aud_are_not_checked_when_not_configured(autojump_clock: Any, harness: Harness) -> None:
    token = jwt.encode(claims_for(harness, iss="anyone", aud="anything"), SECRET, algorithm="HS256")
    await assert_accepted(harness, token)


# --- expiry during a connection ------------------------------------------------------------

async def test_token_expiry_mid_connection_closes_with_4001(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice", token=harness.token("alice", ttl=60))
    opened = trio.current_time()
    early = await alice.nothing_more(59.5)
    assert [e for e in early if e["event"] == "connection:closed"] == []
    await still_works(alice)
    events, code = await until_closed(alice, 5)
    assert code == 4001
    assert events and events[-1]["event"] == "connection:closed", events
    assert events[-1]["data"]["reason"] == "token_expired"
    assert events[-1]["data"]["code"] == 4001
    assert 60 - 1e-6 <= trio.current_time() - opened <= 61


# --- auth:refresh ----------------------------------------------------------------------------

async def test_refresh_with_the_same_sub_extends_the_connection(autojump_clock: Any, harness: Harness) -> None:
    alice = await harness.connect("alice", token=harness.token("alice", ttl=60))
    opened = trio.current_time()
    await trio.sleep(30)
    new_token = harness.token("alice", ttl=600)
    expected_exp = int(harness.server.clock() + 600)
    ref = await alice.send("auth:refresh", {"token": new_token})
    reply = await alice.expect("auth:refreshed", ref=ref)
    assert reply["ref"] == ref
    assert reply["data"] == {"expires_at": iso(expected_exp)}, reply

    # Past the old expiry the connection still serves ...
    assert [e for e in await alice.nothing_more(60) if e["event"] == "connection:closed"] == []
    await still_works(alice)
    # ... and it closes at the new one.
    events, code = await until_closed(alice, 600)
    assert code == 4001
    assert events[-1]["data"] == {"reason": "token_expired", "code": 4001,
                                  "timestamp": events[-1]["data"]["timestamp"]}
    assert 630 - 1 <= trio.current_time() - opened <= 631


REFRESH_REFUSED = {
    "other_sub": ("FORBIDDEN", lambda h: h.token("mallory", ttl=600)),
    "garbage": ("UNAUTHORIZED", lambda h: "not-a-jwt"),
    "expired": ("UNAUTHORIZED", lambda h: h.token("alice", ttl=-1)),
    "bad_signature": ("UNAUTHORIZED", lambda h: jwt.encode(
        claims_for(h, ttl=600), "another-secret-0123456789abcdef0123456789", algorithm="HS256")),
    "alg_none": ("UNAUTHORIZED", lambda h: unsigned(claims_for(h, ttl=600))),
    "tampered_exp": ("UNAUTHORIZED", lambda h: tampered(h.token("alice", ttl=60),
                                                        exp=int(h.server.clock()) + 6000)),
    "missing_exp": ("UNAUTHORIZED", lambda h: jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")),
}


@pytest.mark.parametrize("case", sorted(REFRESH_REFUSED))
async def test_refused_refresh_keeps_the_old_expiry(autojump_clock: Any, harness: Harness, case: str) -> None:
    code, make = REFRESH_REFUSED[case]
    alice = await harness.connect("alice", token=harness.token("alice", ttl=60))
    opened = trio.current_time()
    await trio.sleep(10)
    ref = await alice.send("auth:refresh", {"token": make(harness)})
    reply = await alice.expect("error", ref=ref)
    assert reply["data"]["code"] == code, reply
    assert reply["data"]["request_event"] == "auth:refresh", reply
    await still_works(alice)
    events, close_code = await until_closed(alice, 60)
    assert close_code == 4001
    assert [e["event"] for e in events if e["event"] == "auth:refreshed"] == []
    assert events[-1]["data"]["reason"] == "token_expired"
    assert 60 - 1e-6 <= trio.current_time() - opened <= 61


# --- Origin allow-list -----------------------------------------------------------------------

@pytest.mark.parametrize("settings", ["origins"], indirect=True)
async def test_allowed_origin_passes(autojump_clock: Any, harness: Harness) -> None:
    await assert_accepted(harness, harness.token("alice"), headers=[("Origin", "https://app.winkr.test")])


@pytest.mark.parametrize("settings", ["origins"], indirect=True)
@pytest.mark.parametrize("origin", ["https://evil.test", "http://app.winkr.test",
                                    "https://app.winkr.test.evil.test", "null"])
async def test_other_origin_is_refused_403(autojump_clock: Any, harness: Harness, origin: str) -> None:
    rejection = await refused(harness, bearer(harness.token("alice")) + [("Origin", origin)])
    assert rejection.status_code == 403, (rejection.status_code, rejection.body)
    error_body(rejection)


@pytest.mark.parametrize("origin", ["https://app.winkr.test", "https://evil.test", "null"])
async def test_every_origin_passes_with_the_default_empty_list(autojump_clock: Any, harness: Harness,
                                                               origin: str) -> None:
    await assert_accepted(harness, harness.token("alice"), headers=[("Origin", origin)])
