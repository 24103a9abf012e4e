"""Sign-in through the real OIDC provider (oidc-provider-mock over HTTP), first-run
acceptance, and every refusal the issue lists: each a clear page that creates nothing."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import asyncpg
import jwt
import pytest
import redis.asyncio as aioredis

from tests.control_plane.web.conftest import (
    Web,
    accept_signup,
    authorize_at_mock,
    new_person,
    path_of,
    query_of,
    sign_in_new_user,
    start_signin,
)
from tests.control_plane.web.fake_idp import FakeIdP


async def _identities(pool: asyncpg.Pool, subject: str) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM identities WHERE subject = $1",
                                   subject))


async def test_a_new_user_signs_in_accepts_and_gets_an_account(
    web: Web, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    person = new_person()
    authorize = await start_signin(web, "dev", "/keys")
    q = query_of(authorize)
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    assert q["state"] and q["nonce"] and q["redirect_uri"].startswith(web.origin)
    callback = await authorize_at_mock(authorize, person)
    r = await web.client.get(path_of(callback), allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == "/signup?next=/keys"
    assert await _identities(pool, person["sub"]) == 0  # nothing before acceptance
    await _nothing_personal_in_redis(web, person)

    refused = await accept_signup(web, age_18="")
    assert refused.status == 400
    r = await accept_signup(web, next="/keys")
    assert (r.status, r.headers["Location"]) == (302, "/keys")
    cookie = r.cookies["__Host-qnp_session"]
    assert cookie["httponly"] and cookie["secure"] and cookie["samesite"] == "Lax"
    assert person["email"] not in cookie.value and person["name"] not in cookie.value

    me = (await (await web.client.get("/api/v1/session")).json())["data"]
    assert me["user"]["email"] == person["email"]
    assert me["user"]["name"] == person["name"] and me["user"]["providers"] == ["dev"]
    user_id = await pool.fetchval("SELECT user_id FROM identities WHERE subject = $1",
                                  person["sub"])
    rows = await pool.fetch("SELECT what, policy_version FROM acceptances WHERE user_id = $1"
                            " ORDER BY what", user_id)
    assert [(r["what"], r["policy_version"]) for r in rows] == [
        ("age_18", "2026-04"), ("privacy_policy", "2026-04"), ("terms", "2026-04")]
    role = await pool.fetchval("SELECT role FROM memberships WHERE user_id = $1", user_id)
    assert role == "owner"

    # Signing in again finds the same user; no second first-run.
    web.client.session.cookie_jar.clear()
    callback = await authorize_at_mock(await start_signin(web, "dev"), person)
    r = await web.client.get(path_of(callback), allow_redirects=False)
    assert (r.status, r.headers["Location"]) == (302, "/")
    again = (await (await web.client.get("/api/v1/session")).json())["data"]
    assert again["account_id"] == me["account_id"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "user signed up" in logged  # the log was captured, and names no one:
    assert person["email"] not in logged and person["name"] not in logged


async def _nothing_personal_in_redis(web: Web, person: dict[str, object]) -> None:
    client = aioredis.Redis.from_url(web.settings.redis_url)
    try:
        async for key in client.scan_iter(match=f"{web.settings.redis_prefix}*"):
            value = await client.get(key) if await client.type(key) == b"string" else b""
            for secret in (person["email"], person["name"], person["sub"]):
                assert str(secret).encode() not in key + (value or b""), key
    finally:
        await client.aclose()


async def test_a_state_mismatch_and_a_replayed_code_are_refused(
    web: Web, pool: asyncpg.Pool
) -> None:
    person = new_person()
    callback = await authorize_at_mock(await start_signin(web, "dev"), person)
    forged = path_of(callback).replace(query_of(callback)["state"], "not-our-state")
    r = await web.client.get(forged, allow_redirects=False)
    assert r.status == 400 and "Sign-in refused" in await r.text()
    first = await web.client.get(path_of(callback), allow_redirects=False)
    assert first.status == 302
    replay = await web.client.get(path_of(callback), allow_redirects=False)
    assert replay.status == 400 and "already used" in await replay.text()
    assert await _identities(pool, person["sub"]) == 0


async def test_a_form_post_callback_signs_in_and_its_binding_survives_cross_site(
    web: Web, fake_idp: FakeIdP
) -> None:
    r = await web.client.get("/auth/fake/start", allow_redirects=False)
    binding = r.cookies["__Host-qnp_signin"]
    assert binding["samesite"] == "None" and binding["secure"] and binding["httponly"]
    q = query_of(r.headers["Location"])
    fake_idp.nonce = q["nonce"]
    fake_idp.make_token = lambda nonce: fake_idp.good_token(
        nonce, sub=f"post-{uuid.uuid4().hex[:8]}", email=f"p-{uuid.uuid4().hex[:8]}@x.test")
    # A cross-site POST: no Origin of ours, no CSRF token (the route is exempt).
    r = await web.client.post("/auth/fake/callback", data={"code": "c", "state": q["state"]},
                              headers={"Origin": "https://appleid.apple.com"},
                              allow_redirects=False)
    assert r.status == 302 and r.headers["Location"].startswith("/signup"), await r.text()


async def test_a_callback_from_another_browser_is_refused(web: Web) -> None:
    callback = await authorize_at_mock(await start_signin(web, "dev"), new_person())
    web.client.session.cookie_jar.clear()  # the binding cookie stays with the first browser
    r = await web.client.get(path_of(callback), allow_redirects=False)
    assert r.status == 400 and "another browser" in await r.text()


FORGERIES: dict[str, Callable[[FakeIdP, str], str]] = {
    "wrong nonce": lambda idp, nonce: idp.good_token("another-nonce"),
    "other issuer": lambda idp, nonce: idp.good_token(nonce, iss="https://evil.example"),
    "other audience": lambda idp, nonce: idp.good_token(nonce, aud="someone-else"),
    "expired": lambda idp, nonce: idp.good_token(nonce, exp=1_000_000, iat=999_000),
    "not yet valid": lambda idp, nonce: idp.good_token(nonce, iat=4_000_000_000,
                                                       exp=4_000_000_300),
    "alg none": lambda idp, nonce: idp.unsigned_token(nonce),
    "hs256 with the public key": lambda idp, nonce: idp.hs256_with_public_key(nonce),
    "unknown kid": lambda idp, nonce: _with_kid(idp, nonce),
    "no exp": lambda idp, nonce: idp.good_token(nonce, exp=None),
}


def _with_kid(idp: FakeIdP, nonce: str) -> str:
    return jwt.encode(idp.claims(nonce), idp.key, algorithm="RS256",
                      headers={"kid": "unknown-kid"})


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_forged_id_tokens_are_refused_and_create_nothing(
    web: Web, fake_idp: FakeIdP, pool: asyncpg.Pool, forgery: str
) -> None:
    subject = f"forged-{uuid.uuid4().hex[:8]}"
    authorize = await start_signin(web, "fake")
    q = query_of(authorize)
    fake_idp.nonce = q["nonce"]
    make = FORGERIES[forgery]
    fake_idp.subject = subject
    fake_idp.make_token = lambda nonce: make(fake_idp, nonce)
    r = await web.client.get(f"/auth/fake/callback?code=c0de&state={q['state']}",
                             allow_redirects=False)
    text = await r.text()
    assert r.status == 400, text
    assert "Sign-in refused" in text and "Traceback" not in text
    assert "__Host-qnp_session" not in r.cookies and "__Host-qnp_signup" not in r.cookies
    assert fake_idp.token_requests[-1]["code_verifier"]  # PKCE verifier was sent
    assert await _identities(pool, subject) == 0


async def test_the_genuine_fake_token_is_accepted(web: Web, fake_idp: FakeIdP) -> None:
    """The refusals above are for the forgery, not for the fake provider itself."""
    authorize = await start_signin(web, "fake")
    q = query_of(authorize)
    fake_idp.nonce = q["nonce"]
    fake_idp.make_token = lambda nonce: fake_idp.good_token(
        nonce, sub=f"genuine-{uuid.uuid4().hex[:8]}",
        email=f"g-{uuid.uuid4().hex[:8]}@example.test", email_verified="true")
    r = await web.client.get(f"/auth/fake/callback?code=c0de&state={q['state']}",
                             allow_redirects=False)
    assert r.status == 302 and r.headers["Location"].startswith("/signup"), await r.text()


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x",
                                    "/\\evil.example", "javascript:alert(1)"])
async def test_a_next_on_another_origin_is_never_followed(web: Web, target: str) -> None:
    person = new_person()
    callback = await authorize_at_mock(await start_signin(web, "dev", target), person)
    r = await web.client.get(path_of(callback), allow_redirects=False)
    assert r.headers["Location"] == "/signup?next=/"
    r = await accept_signup(web, next=target)
    assert (r.status, r.headers["Location"]) == (302, "/")


async def test_an_unverified_email_is_refused(web: Web, pool: asyncpg.Pool) -> None:
    person = new_person() | {"email_verified": False}
    callback = await authorize_at_mock(await start_signin(web, "dev"), person)
    r = await web.client.get(path_of(callback), allow_redirects=False)
    assert r.status == 400 and "did not confirm your email" in await r.text()
    assert await _identities(pool, person["sub"]) == 0


async def test_the_same_email_from_another_provider_is_not_linked_silently(
    web: Web, fake_idp: FakeIdP, pool: asyncpg.Pool
) -> None:
    me = await sign_in_new_user(web)
    web.client.session.cookie_jar.clear()
    authorize = await start_signin(web, "fake")
    q = query_of(authorize)
    fake_idp.nonce = q["nonce"]
    subject = f"other-{uuid.uuid4().hex[:8]}"
    fake_idp.make_token = lambda nonce: fake_idp.good_token(
        nonce, sub=subject, email=me["user"]["email"])
    r = await web.client.get(f"/auth/fake/callback?code=c&state={q['state']}",
                             allow_redirects=False)
    assert r.status == 400 and "already exists" in await r.text()
    assert await _identities(pool, subject) == 0
