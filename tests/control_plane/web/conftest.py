"""Fixtures for the web service: the real ``oidc-provider-mock`` as a process, a fake
provider for forged tokens, and the web app over the test's stores, served on a port
known in advance so QNP_PUBLIC_URL is its real origin."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
import pytest
from aiohttp import CookieJar
from aiohttp.test_utils import TestClient, TestServer

from control_plane.runtime import open_stores
from control_plane.settings import Settings
from control_plane.web.app import make_web_app
from shared.redis_names import RedisNames
from tests.control_plane.factories import make_settings
from tests.control_plane.web.fake_idp import FakeIdP
from tests.support import ModuleProcess, free_port, wait_for_http

SESSION_SECRET = "web-test-session-secret-" + "0" * 16


@pytest.fixture(scope="session")
def oidc_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The issuer URL of a real oidc-provider-mock process on 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("oidc") / "oidc.log"
    with ModuleProcess("oidc_provider_mock", ["--port", str(port)], log_path=log):
        asyncio.run(wait_for_http(
            f"http://127.0.0.1:{port}/.well-known/openid-configuration", expect_status=200))
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
async def fake_idp() -> AsyncIterator[FakeIdP]:
    async for idp in FakeIdP().serve():
        yield idp


@dataclass
class Web:
    client: TestClient[Any, Any]
    origin: str
    settings: Settings

    @property
    def same_origin(self) -> dict[str, str]:
        return {"Origin": self.origin, "Sec-Fetch-Site": "same-origin"}


def web_settings(migrated_url: str, redis_url: str, names: RedisNames, port: int,
                 providers: list[dict[str, str]], **extra: str) -> Settings:
    return make_settings(migrated_url, redis_url, names, QNP_WEB_PORT=str(port),
                         QNP_PUBLIC_URL=f"http://127.0.0.1:{port}",
                         QNP_SESSION_SECRET=SESSION_SECRET,
                         QNP_OIDC_PROVIDERS=orjson.dumps(providers).decode(), **extra)


@asynccontextmanager
async def serve_web(settings: Settings) -> AsyncIterator[Web]:
    """The web app over its own stores, like ``serve --role web``; cookies are kept
    (Secure ones too: browsers send them to http://127.0.0.1)."""
    port = settings.web_port
    async with open_stores(settings) as stores:
        server = TestServer(make_web_app(settings, stores), host="127.0.0.1", port=port)
        jar = CookieJar(unsafe=True, treat_as_secure_origin=[f"http://127.0.0.1:{port}"])
        async with TestClient(server, cookie_jar=jar) as client:
            yield Web(client, f"http://127.0.0.1:{port}", settings)


@pytest.fixture
async def web(migrated_url: str, redis_url: str, redis_names: RedisNames, oidc_mock: str,
              fake_idp: FakeIdP) -> AsyncIterator[Web]:
    providers = [
        {"name": "dev", "label": "Dev sign-in", "issuer": oidc_mock,
         "client_id": "qnp-dev", "client_secret": "dev-secret"},
        {"name": "fake", "label": "Fake", "issuer": fake_idp.issuer,
         "client_id": fake_idp.client_id, "client_secret": "fake-secret"},
    ]
    settings = web_settings(migrated_url, redis_url, redis_names, free_port(), providers)
    async with serve_web(settings) as w:
        yield w


def new_person() -> dict[str, Any]:
    tag = secrets.token_hex(4)
    return {"sub": f"person-{tag}", "email": f"person-{tag}@example.test",
            "email_verified": True, "name": f"Person {tag}"}


async def start_signin(web: Web, provider: str, next_path: str = "/") -> str:
    """GET /auth/<provider>/start; the provider's authorization URL we are sent to."""
    r = await web.client.get(f"/auth/{provider}/start", params={"next": next_path},
                             allow_redirects=False)
    assert r.status == 302, await r.text()
    return r.headers["Location"]


async def authorize_at_mock(authorize_url: str, person: dict[str, Any]) -> str:
    """Sign ``person`` in at the real mock provider; the callback URL it redirects to."""
    issuer = authorize_url.split("/oauth2/", 1)[0]
    async with aiohttp.ClientSession() as s:
        claims = {k: v for k, v in person.items() if k != "sub"}
        async with s.put(f"{issuer}/users/{person['sub']}", json=claims) as r:
            assert r.status == 204
        async with s.post(authorize_url, data={"sub": person["sub"]},
                          allow_redirects=False) as r:
            assert r.status == 302, await r.text()
            return r.headers["Location"]


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + ("?" + parts.query if parts.query else "")


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


async def accept_signup(web: Web, **form: str) -> aiohttp.ClientResponse:
    page = await web.client.get("/signup")
    assert page.status == 200, await page.text()
    token = re.search(r'name="csrf_token" value="([^"]+)"', await page.text())
    assert token
    body = {"csrf_token": token.group(1), "age_18": "on", "terms": "on",
            "privacy_policy": "on", "next": "/", **form}
    return await web.client.post("/signup", data=body, headers=web.same_origin,
                                 allow_redirects=False)


async def sign_in_new_user(web: Web, person: dict[str, Any] | None = None
                           ) -> dict[str, Any]:
    """Through the real provider, first run included; the /api/v1/session document."""
    person = person or new_person()
    callback = await authorize_at_mock(await start_signin(web, "dev"), person)
    r = await web.client.get(path_of(callback), allow_redirects=False)
    assert r.status == 302 and r.headers["Location"].startswith("/signup"), await r.text()
    r = await accept_signup(web)
    assert r.status == 302, await r.text()
    r = await web.client.get("/api/v1/session")
    assert r.status == 200, await r.text()
    data: dict[str, Any] = (await r.json())["data"]
    return data
