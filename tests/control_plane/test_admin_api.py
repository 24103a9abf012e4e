"""The admin HTTP API: auth, status codes, and JSON errors for bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from control_plane.admin_api import make_app
from control_plane.roles import Ingest
from control_plane.runtime import open_stores
from control_plane.settings import Settings
from shared.apikeys import KeyRecord, parse
from shared.events import STREAM_FIELD
from tests.control_plane.factories import ADMIN_TOKEN, make_event

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    """The admin app over the stores it shares with an ingest role, as ``serve`` runs it."""
    async with open_stores(settings) as stores:
        ingest = Ingest(stores)
        await ingest.start()
        try:
            async with TestClient(TestServer(make_app(settings, stores))) as c:
                yield c
        finally:
            await ingest.stop(5.0)


async def test_the_app_alone_opens_its_own_stores(settings: Settings) -> None:
    async with TestClient(TestServer(make_app(settings))) as c:
        r = await c.get("/healthz")
        assert (r.status, (await r.json())["postgres"]) == (200, True)


async def _error(response: ClientResponse, status: int, kind: str) -> str:
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["error"]["type"] == kind
    message: str = body["error"]["message"]
    assert "Traceback" not in message
    return message


async def _account(client: TestClient[Any, Any]) -> str:
    r = await client.post("/admin/accounts", json={"name": "acme"}, headers=AUTH)
    assert r.status == 201
    body = await r.json()
    assert body["name"] == "acme"
    account_id: str = body["id"]
    return account_id


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN},
     {"Authorization": f"Basic {ADMIN_TOKEN}"}],
)
async def test_admin_routes_need_the_bearer_token(
    client: TestClient[Any, Any], headers: dict[str, str]
) -> None:
    r = await client.post("/admin/accounts", json={"name": "x"}, headers=headers)
    await _error(r, 401, "unauthorized")
    r = await client.get("/admin/nowhere", headers=headers)
    await _error(r, 401, "unauthorized")


async def test_key_lifecycle(client: TestClient[Any, Any], settings: Settings,
                             rclient: aioredis.Redis) -> None:
    account_id = await _account(client)

    r = await client.post(f"/admin/accounts/{account_id}/keys", json={"name": "ci"},
                          headers=AUTH)
    assert r.status == 201
    issued = await r.json()
    key_id = parse(issued["key"]).key_id
    assert (issued["key_id"], issued["name"], issued["status"]) == (key_id, "ci", "active")

    r = await client.get(f"/admin/accounts/{account_id}/keys", headers=AUTH)
    assert r.status == 200
    (listed,) = (await r.json())["keys"]
    assert listed["key_id"] == key_id
    assert "key" not in listed and "secret_hash" not in listed

    r = await client.post(f"/admin/keys/{key_id}/revoke", headers=AUTH)
    assert r.status == 200
    assert (await r.json())["status"] == "revoked"
    record = KeyRecord.decode(await rclient.get(settings.names.key_record(key_id)))
    assert record.status == "revoked"


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b"{not json", 400, "invalid_request"),
        (b"[1, 2]", 400, "invalid_request"),
        (b"{}", 400, "invalid_request"),
        (b'{"name": 7}', 400, "invalid_request"),
        (b'{"name": "' + b"x" * 300 + b'"}', 400, "invalid_request"),
        (b"x" * 70_000, 413, "invalid_request"),
    ],
)
async def test_bad_account_bodies_are_400_json(
    client: TestClient[Any, Any], body: bytes, status: int, kind: str
) -> None:
    r = await client.post("/admin/accounts", data=body, headers=AUTH)
    await _error(r, status, kind)


async def test_unknown_things_are_404_json(client: TestClient[Any, Any]) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    for method, path in [
        ("POST", f"/admin/accounts/{missing}/keys"),
        ("GET", f"/admin/accounts/{missing}/keys"),
        ("GET", "/admin/accounts/not-a-uuid/usage"),
        ("POST", "/admin/keys/abcdefghijkl/revoke"),
        ("POST", "/admin/keys/NOT_A_KEY_ID/revoke"),
        ("GET", "/admin/no-such-route"),
    ]:
        r = await client.request(method, path, headers=AUTH)
        await _error(r, 404, "not_found")
    r = await client.delete("/admin/accounts", headers=AUTH)
    await _error(r, 405, "invalid_request")


async def test_usage_lists_ingested_requests_and_totals(
    client: TestClient[Any, Any], settings: Settings, rclient: aioredis.Redis
) -> None:
    account_id = await _account(client)
    for n in range(3):
        event = make_event(account_id, cost_micros=100 * (n + 1))
        await rclient.xadd(settings.names.events, {STREAM_FIELD: event.encode()})

    body: dict[str, Any] = {}
    for _ in range(600):  # the app's own ingest task picks the events up (a hang guard)
        r = await client.get(f"/admin/accounts/{account_id}/usage?limit=2", headers=AUTH)
        assert r.status == 200
        body = await r.json()
        if body["totals"]["requests"] == 3:
            break
        await asyncio.sleep(0.05)

    assert body["totals"]["requests"] == 3
    assert body["totals"]["cost_micros"] == 600
    assert body["totals"]["total_tokens"] == 3 * (12 + 34)
    assert [r["cost_micros"] for r in body["records"]] == [300, 200]  # newest first
    first = body["records"][0]
    assert (first["model"], first["outcome"], first["latency_ms"]) == (
        "gpt-4o-mini-2024-07-18", "ok", 1000.0,
    )
    metrics = await (await client.get("/metrics")).text()
    assert "qnp_ingest_events_ingested_total 3.0" in metrics

    for query in ("limit=abc", "limit=0", "limit=100000", "since=yesterday",
                  "since=2030-01-02&until=2030-01-01"):
        r = await client.get(f"/admin/accounts/{account_id}/usage?{query}", headers=AUTH)
        await _error(r, 400, "invalid_request")


async def test_health_needs_no_token(client: TestClient[Any, Any]) -> None:
    r = await client.get("/healthz")
    assert r.status == 200
    assert await r.json() == {"status": "ok", "postgres": True, "redis": True}
