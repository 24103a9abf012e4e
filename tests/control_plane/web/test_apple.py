"""Sign in with Apple's quirks against a fake of Apple's endpoints that checks what
Apple checks: response_mode=form_post (a cross-site POST callback), client_secret_post
with an ES256 JWT minted from the .p8 key (iss team id, sub services id, aud appleid,
exp at most six months) and cached, the name only in the first callback's ``user``
field, and ``email_verified`` as the string "true"."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.auth import oidc
from control_plane.settings import AppleKey, OIDCProvider
from shared.redis_names import RedisNames
from tests.control_plane.web.conftest import Web, accept_signup, query_of, serve_web, web_settings
from tests.control_plane.web.fake_idp import FakeIdP
from tests.support import free_port

SERVICES_ID = "com.example.qnp.web"


def _p8(tmp_path: Path) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "AuthKey.p8"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path, key


@pytest.fixture
async def apple(fake_idp: FakeIdP, tmp_path: Path, migrated_url: str, redis_url: str,
                redis_names: RedisNames) -> AsyncIterator[tuple[Web, FakeIdP]]:
    p8, key = _p8(tmp_path)
    fake_idp.client_id = SERVICES_ID
    fake_idp.apple_public_key = key.public_key()
    provider = {"name": "apple", "label": "Apple", "issuer": fake_idp.issuer,
                "client_id": SERVICES_ID,
                "apple": {"team_id": fake_idp.apple_team_id, "key_id": fake_idp.apple_key_id,
                          "private_key_file": str(p8)}}
    settings = web_settings(migrated_url, redis_url, redis_names, free_port(), [provider])
    async with serve_web(settings) as web:
        yield web, fake_idp


async def test_apple_form_post_sign_in_with_a_minted_secret_and_the_first_name(
    apple: tuple[Web, FakeIdP]
) -> None:
    web, idp = apple
    authorize = await _start(web)
    q = query_of(authorize)
    assert q["response_mode"] == "form_post" and "name" in q["scope"].split()
    idp.nonce = q["nonce"]
    email = f"a-{uuid.uuid4().hex[:8]}@privaterelay.appleid.com"
    idp.make_token = lambda nonce: idp.good_token(
        nonce, sub=f"apple-{uuid.uuid4().hex[:8]}", email=email, email_verified="true")
    user = orjson.dumps({"name": {"firstName": "Ada", "lastName": "Lovelace"},
                         "email": email}).decode()
    r = await web.client.post("/auth/apple/callback",
                              data={"code": "c0de", "state": q["state"], "user": user},
                              headers={"Origin": "https://appleid.apple.com"},
                              allow_redirects=False)
    assert r.status == 302 and r.headers["Location"].startswith("/signup"), await r.text()
    sent = idp.token_requests[-1]
    assert sent["client_id"] == SERVICES_ID and sent["code_verifier"]
    assert (await accept_signup(web)).status == 302
    me = (await (await web.client.get("/api/v1/session")).json())["data"]
    assert (me["user"]["name"], me["user"]["email"]) == ("Ada Lovelace", email)


async def test_a_secret_apple_would_not_accept_is_a_refusal(
    apple: tuple[Web, FakeIdP]
) -> None:
    web, idp = apple
    idp.apple_public_key = ec.generate_private_key(ec.SECP256R1()).public_key()  # not ours
    q = query_of(await _start(web))
    idp.nonce = q["nonce"]
    r = await web.client.post("/auth/apple/callback", data={"code": "c", "state": q["state"]},
                              allow_redirects=False)
    assert r.status == 400 and "refused the code" in await r.text()


async def test_the_client_secret_is_cached_and_renewed_before_six_months(
    tmp_path: Path
) -> None:
    p8, key = _p8(tmp_path)
    provider = OIDCProvider(name="apple", label="Apple", issuer="https://appleid.apple.com",
                            client_id=SERVICES_ID,
                            apple=AppleKey("TEAM123456", "KEY1234567", str(p8)))
    now = [1_800_000_000.0]
    async with aiohttp.ClientSession() as http:
        client = oidc.Client(provider, http, clock=lambda: now[0])
        first = client.client_secret()
        assert client.client_secret() == first  # cached
        claims = jwt.decode(first, key.public_key(), algorithms=["ES256"],
                            audience="https://appleid.apple.com", issuer="TEAM123456",
                            options={"verify_exp": False, "verify_iat": False})
        assert claims["sub"] == SERVICES_ID and claims["iat"] == now[0]
        assert claims["exp"] - claims["iat"] <= 15_777_000  # Apple's six months
        assert jwt.get_unverified_header(first)["kid"] == "KEY1234567"
        now[0] += oidc.APPLE_SECRET_TTL_S - 3600  # within a day of its expiry
        assert client.client_secret() != first


async def _start(web: Web) -> str:
    r = await web.client.get("/auth/apple/start", allow_redirects=False)
    assert r.status == 302
    return r.headers["Location"]
