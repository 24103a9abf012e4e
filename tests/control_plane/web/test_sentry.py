"""Sentry in the web service, in this process: the real SDK (started by the same
``shared.monitoring.init`` as ``serve``) reports to our sink (tests/sentry_sink.py)
through the real middlewares. A test-only route raises an exception whose message and
cause quote a prompt, a reply, the caller's API key and an e-mail address, for a request
that carries them in its body, headers, cookie and query string too: the event arrives,
none of them is in it. A restricted account's failure is not sent at all (issue 14)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import sentry_sdk
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from control_plane.keys import issue_key
from control_plane.runtime import open_stores
from control_plane.settings import Settings
from control_plane.web.app import make_web_app
from shared import monitoring
from shared.redis_names import RedisNames
from tests.control_plane.factories import make_settings
from tests.sentry_canaries import EMAIL, PROMPT, REPLY, assert_no_canary
from tests.sentry_sink import SentrySink

HANG_GUARD_S = 30.0


class OpenAccountFailure(RuntimeError):
    pass


class RestrictedAccountFailure(RuntimeError):
    pass


@pytest.fixture
async def sink() -> AsyncIterator[SentrySink]:
    async with SentrySink() as s:
        yield s


@pytest.fixture
def monitored(migrated_url: str, redis_url: str, redis_names: RedisNames,
              sink: SentrySink) -> Settings:
    return make_settings(migrated_url, redis_url, redis_names, SENTRY_DSN=sink.dsn(),
                         QNP_SESSION_SECRET="s" * 32)


async def _account(pool: asyncpg.Pool, restricted: bool) -> str:
    account_id: str = await pool.fetchval(
        "INSERT INTO accounts (id, name, restricted_at) VALUES (gen_random_uuid(), 'test', "
        "CASE WHEN $1 THEN now() END) RETURNING id::text", restricted)
    return account_id


def _types(sink: SentrySink) -> set[str]:
    return {v.get("type", "") for e in sink.events()
            for v in e.get("exception", {}).get("values", [])}


async def test_failures_reach_sentry_without_content_and_never_for_restricted_accounts(
        monitored: Settings, sink: SentrySink) -> None:
    assert monitoring.init(monitored.monitoring.sentry_dsn, service="control_plane")
    try:
        async with open_stores(monitored) as stores:
            open_id = await _account(stores.pool, restricted=False)
            restricted_id = await _account(stores.pool, restricted=True)
            keys = {account: (await issue_key(stores.pool, stores.redis, monitored.names,
                                              account, bcrypt_rounds=4)).key
                    for account in (open_id, restricted_id)}
            app = make_web_app(monitored, stores)

            async def boom(request: web.Request) -> web.Response:
                body = await request.json()
                failure = (RestrictedAccountFailure if request.query["who"] == "restricted"
                           else OpenAccountFailure)
                try:
                    raise ValueError(f"upstream replied {REPLY}")
                except ValueError as cause:
                    raise failure(f"{body['messages'][0]['content']} for "
                                  f"{request.headers['Authorization']} {EMAIL}") from cause

            app.router.add_post("/api/v1/test-only/boom", boom)  # test-only: a bug
            async with TestClient(TestServer(app, host="127.0.0.1")) as client:
                for who, account in (("restricted", restricted_id), ("open", open_id)):
                    r = await client.post(
                        "/api/v1/test-only/boom",
                        params={"who": who, "q": PROMPT, "email": EMAIL},
                        json={"model": "m", "messages": [{"role": "user", "content": PROMPT}],
                              "email": EMAIL},
                        headers={"Authorization": f"Bearer {keys[account]}",
                                 "X-Reply": REPLY, "Cookie": f"note={EMAIL}"})
                    assert r.status == 500
                    assert PROMPT not in await r.text()
        # The SDK's calls block: off the loop, which serves the sink meanwhile.
        await asyncio.to_thread(sentry_sdk.flush, HANG_GUARD_S)
        await sink.wait_for(lambda s: "OpenAccountFailure" in _types(s), HANG_GUARD_S)
    finally:
        await asyncio.to_thread(monitoring.close)
    # The restricted account's failure happened first: had it been sent, it would be in.
    assert "RestrictedAccountFailure" not in _types(sink)
    [event] = [e for e in sink.events()
               if any(v.get("type") == "OpenAccountFailure"
                      for v in e["exception"]["values"])]
    assert event["logentry"]["message"] == "web request failed"  # the template: no params
    assert event["tags"] == {"service": "control_plane"}
    assert {"request", "user", "extra"}.isdisjoint(event)
    assert_no_canary(sink, PROMPT, REPLY, EMAIL, *keys.values())
