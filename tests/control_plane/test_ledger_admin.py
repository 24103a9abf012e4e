"""Credit, balance, limits and suspension through the admin API and the CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from control_plane.admin_api import make_app
from control_plane.settings import Settings
from shared.apikeys import KeyRecord
from tests.control_plane.factories import ADMIN_TOKEN
from tests.control_plane.test_admin_api import _error
from tests.control_plane.test_cli import _cli, _env, _json

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(make_app(settings))) as c:
        yield c


async def _account(client: TestClient[Any, Any]) -> str:
    r = await client.post("/admin/accounts", json={"name": "acme"}, headers=AUTH)
    assert r.status == 201
    account_id: str = (await r.json())["id"]
    return account_id


async def test_credit_balance_limits_and_suspension(
    client: TestClient[Any, Any], settings: Settings, rclient: aioredis.Redis
) -> None:
    a = await _account(client)
    credit = f"/admin/accounts/{a}/credit"
    body = {"amount_micros": 10_000_000, "kind": "topup", "reference": f"pay-{a}"}

    r = await client.post(credit, json=body, headers=AUTH)
    assert r.status == 201
    done = await r.json()
    assert done["entry"]["amount_micros"] == 10_000_000 and done["created"]
    assert done["balance"] == {"ledger_micros": 10_000_000, "live_micros": 10_000_000,
                               "reserved_micros": 0}
    r = await client.post(credit, json=body, headers=AUTH)
    assert r.status == 200 and (await r.json())["entry"] == done["entry"]
    r = await client.post(credit, json={"amount_micros": -2_000_000, "kind": "adjustment"},
                          headers=AUTH)
    assert r.status == 201

    r = await client.get(f"/admin/accounts/{a}/balance", headers=AUTH)
    assert r.status == 200
    assert await r.json() == {"ledger_micros": 8_000_000, "live_micros": 8_000_000,
                              "reserved_micros": 0}

    r = await client.put(f"/admin/accounts/{a}/limits", json={"rpm": 60, "conc": 2},
                         headers=AUTH)
    assert r.status == 200 and (await r.json())["limits"] == {"rpm": 60, "conc": 2}
    r = await client.post(f"/admin/accounts/{a}/keys", json={"name": "ci"}, headers=AUTH)
    key_id = (await r.json())["key_id"]
    r = await client.put(f"/admin/keys/{key_id}/limits", json={"tpm": 1000}, headers=AUTH)
    assert r.status == 200 and (await r.json())["limits"] == {"tpm": 1000}

    r = await client.post(f"/admin/accounts/{a}/suspend", headers=AUTH)
    assert r.status == 200 and (await r.json())["status"] == "suspended"
    record = KeyRecord.decode(await rclient.get(settings.names.key_record(key_id)))
    assert (record.status, record.limits) == ("suspended", {"tpm": 1000})
    r = await client.post(f"/admin/accounts/{a}/keys", json={}, headers=AUTH)
    await _error(r, 409, "conflict")
    r = await client.post(f"/admin/accounts/{a}/resume", headers=AUTH)
    assert r.status == 200 and (await r.json())["status"] == "active"
    state = await rclient.hmget(settings.names.account_state(a), "status", "rpm", "bal")
    assert state == [b"active", b"60", b"8000000"]


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("credit", b"{}", 400, "invalid_request"),
        ("credit", b'{"amount_micros": "10"}', 400, "invalid_request"),
        ("credit", b'{"amount_micros": 1.5}', 400, "invalid_request"),
        ("credit", b'{"amount_micros": 100000000000000}', 400, "invalid_request"),
        ("credit", b'{"amount_micros": 5, "kind": "debit"}', 400, "invalid_request"),
        ("credit", b'{"amount_micros": -5, "kind": "topup"}', 400, "invalid_request"),
        ("credit", b"[1]", 400, "invalid_request"),
        ("limits", b'{"rpm": -1}', 400, "invalid_request"),
        ("limits", b'{"rpm": "fast"}', 400, "invalid_request"),
        ("limits", b'{"bogus": 1}', 400, "invalid_request"),
        ("limits", b"{not json", 400, "invalid_request"),
    ],
)
async def test_bad_input_is_400_json(
    client: TestClient[Any, Any], path: str, body: bytes, status: int, kind: str
) -> None:
    a = await _account(client)
    method = client.put if path == "limits" else client.post
    r = await method(f"/admin/accounts/{a}/{path}", data=body, headers=AUTH)
    await _error(r, status, kind)


async def test_unknown_targets_and_reused_references(client: TestClient[Any, Any]) -> None:
    missing = "00000000-0000-0000-0000-000000000000"
    for method, path in [
        ("POST", f"/admin/accounts/{missing}/credit"),
        ("GET", f"/admin/accounts/{missing}/balance"),
        ("GET", "/admin/accounts/nope/balance"),
        ("PUT", f"/admin/accounts/{missing}/limits"),
        ("PUT", "/admin/keys/abcdefghijkl/limits"),
        ("POST", f"/admin/accounts/{missing}/suspend"),
        ("POST", f"/admin/accounts/{missing}/resume"),
    ]:
        body = {"amount_micros": 1} if path.endswith("credit") else {}
        r = await client.request(method, path, json=body, headers=AUTH)
        await _error(r, 404, "not_found")
    a, b = await _account(client), await _account(client)
    reused = {"amount_micros": 1, "reference": f"ref-{a}"}
    r = await client.post(f"/admin/accounts/{a}/credit", json=reused, headers=AUTH)
    assert r.status == 201
    r = await client.post(f"/admin/accounts/{b}/credit", json=reused, headers=AUTH)
    await _error(r, 409, "conflict")


async def test_cli_json(settings: Settings, rclient: aioredis.Redis) -> None:
    env = _env(settings)
    account = await _json(env, "create-account", "demo")
    a = account["id"]
    done = await _json(env, "credit", a, "10", "--reference", f"cli-{a}")
    assert done["entry"]["amount_micros"] == 10_000_000
    assert done["balance"]["live_micros"] == 10_000_000
    again = await _json(env, "credit", a, "10", "--reference", f"cli-{a}")
    assert not again["created"] and again["entry"]["id"] == done["entry"]["id"]
    await _json(env, "credit", a, "-0.000001", "--kind", "adjustment")
    assert await _json(env, "balance", a) == {
        "ledger_micros": 9_999_999, "live_micros": 9_999_999, "reserved_micros": 0}

    key = await _json(env, "issue-key", a)
    limited = await _json(env, "set-limits", "--key", key["key_id"], "--rpm", "5")
    assert limited["limits"] == {"rpm": 5}
    limited = await _json(env, "set-limits", "--account", a, "--tpm", "100", "--conc", "0")
    assert limited["limits"] == {"tpm": 100}
    assert (await _json(env, "suspend", a))["status"] == "suspended"
    assert (await _json(env, "resume", a))["status"] == "active"

    code, out, err = await _cli(env, "credit", a, "1.0000001", "--json")
    assert (code, out) == (1, "") and "6 decimal places" in err
    code, out, err = await _cli(env, "set-limits", "--account", a, "--rpm", "-3", "--json")
    assert (code, out) == (1, "") and "rpm" in err
