"""Concurrent data exports are capped: one at a time per account (across replicas: an
advisory lock in Postgres) and QNP_EXPORTS_PER_PROCESS per process; over a cap the
answer is 429 with Retry-After in the API's error format, nothing is recorded, and
the export goes through once the running one has finished."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson
import pytest
from aiohttp import ClientResponse

from control_plane.privacy import export_api
from control_plane.web.state import STORES
from shared.redis_names import RedisNames
from tests.control_plane.privacy.rows import usage_rows
from tests.control_plane.privacy.test_export import _person
from tests.control_plane.web.conftest import Web, serve_web, web_settings
from tests.control_plane.web.fake_idp import FakeIdP
from tests.support import free_port

EXPORT = "/api/v1/account/export"
# More than loopback socket buffers and the client's read buffer hold together, so an
# export whose reader does not read stays running (~550 bytes a row).
STALLING_ROWS = 40_000


@pytest.fixture
async def one_export_web(migrated_url: str, redis_url: str, redis_names: RedisNames,
                         oidc_mock: str, fake_idp: FakeIdP) -> AsyncIterator[Web]:
    providers = [{"name": "dev", "label": "Dev sign-in", "issuer": oidc_mock,
                  "client_id": "qnp-dev", "client_secret": "dev-secret"}]
    settings = web_settings(migrated_url, redis_url, redis_names, free_port(), providers,
                            QNP_EXPORTS_PER_PROCESS="1")
    async with serve_web(settings) as w:
        yield w


async def _refused(response: ClientResponse) -> str:
    assert response.status == 429
    assert response.headers["Retry-After"] == str(export_api.RETRY_AFTER_S)
    body = orjson.loads(await response.read())
    assert body["error"]["code"] == 429
    message: str = body["error"]["message"]
    return message


async def test_an_export_of_an_account_already_exporting_waits_its_turn(web: Web) -> None:
    assert web.client.app is not None
    pool = web.client.app[STORES].pool
    me, mine = await _person(web)
    account = uuid.UUID(me["account_id"])
    # Another replica's export of the account holds its lock.
    async with pool.acquire() as other_replica:
        assert await other_replica.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", export_api._LOCK_CLASS,
            str(account))
        message = await _refused(await web.client.get(EXPORT, headers=mine))
        assert "already running" in message
        await other_replica.execute("SELECT pg_advisory_unlock_all()")
    r = await web.client.get(EXPORT, headers=mine)
    assert r.status == 200
    assert orjson.loads(await r.read())["account_id"] == str(account)
    recorded = await pool.fetchval(
        "SELECT count(*) FROM privacy_requests WHERE account_id = $1", account)
    assert recorded == 1  # the refused one is not a request answered


async def test_a_process_streams_at_most_its_cap_of_exports(one_export_web: Web) -> None:
    web = one_export_web
    assert web.client.app is not None
    pool = web.client.app[STORES].pool
    me, mine = await _person(web)
    _, theirs = await _person(web)
    await usage_rows(pool, uuid.UUID(me["account_id"]), "k1", STALLING_ROWS,
                     datetime.now(UTC))
    running = await web.client.get(EXPORT, headers=mine)  # headers in, body unread
    assert running.status == 200
    try:
        message = await _refused(await web.client.get(EXPORT, headers=theirs))
        assert "too many data exports" in message
        await _refused(await web.client.get(EXPORT, headers=mine))
        doc = orjson.loads(await running.read())  # the running one completes whole
        assert len(doc["usage_logs"]) == STALLING_ROWS
    finally:
        running.release()
    r = await web.client.get(EXPORT, headers=theirs)  # its turn now
    assert r.status == 200 and (await r.read()).endswith(b"}\n")
    assert web.client.app[export_api.RUNNING].count == 0
