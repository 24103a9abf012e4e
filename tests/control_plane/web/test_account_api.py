"""The account API at /api/v1 (OpenRouter's field names): keys CRUD with the secret
shown once, limits and expiry stored and published, key/credits/generation/activity
with exactly what ingest stored, management keys, and cross-account access as 404."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from control_plane import ledger
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from control_plane.web import account_api
from control_plane.web.state import KEYS
from shared.apikeys import KeyRecord
from shared.events import STREAM_FIELD
from tests.control_plane.factories import make_event
from tests.control_plane.web.conftest import Web, sign_in_new_user


async def _signed_in(web: Web) -> tuple[dict[str, Any], dict[str, str]]:
    me = await sign_in_new_user(web)
    return me, {**web.same_origin, "X-CSRF-Token": me["csrf_token"]}


async def _create(web: Web, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = await web.client.post("/api/v1/keys", json=body, headers=headers)
    assert r.status == 201, await r.text()
    created: dict[str, Any] = await r.json()
    return created


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_keys_crud_shows_the_secret_once_and_publishes_limits(
    web: Web, redis: aioredis.Redis
) -> None:
    _, headers = await _signed_in(web)
    expires = (datetime.now(UTC) + timedelta(days=7)).replace(microsecond=0)
    created = await _create(web, headers, name="ci", limit=5.5, limit_reset="weekly",
                            expires_at=expires.isoformat())
    key, data = created["key"], created["data"]
    assert key.startswith("qnp_") and data["hash"] in key
    assert (data["name"], data["limit"], data["limit_reset"]) == ("ci", 5.5, "weekly")
    assert data["limit_remaining"] == 5.5 and data["usage"] == 0
    assert datetime.fromisoformat(data["expires_at"]) == expires

    listed = (await (await web.client.get("/api/v1/keys")).json())["data"]
    assert [k["hash"] for k in listed] == [data["hash"]]
    assert key not in str(listed)  # never shown again
    record = KeyRecord.decode(await redis.get(web.settings.names.key_record(data["hash"])))
    assert (record.credit_limit_micros, record.limit_reset, record.expires_at) == (
        5_500_000, "weekly", int(expires.timestamp()))

    r = await web.client.patch(f"/api/v1/keys/{data['hash']}", headers=headers,
                               json={"limit": None, "disabled": True, "name": "ci-2"})
    patched = (await r.json())["data"]
    assert (patched["limit"], patched["disabled"], patched["name"]) == (None, True, "ci-2")
    record = KeyRecord.decode(await redis.get(web.settings.names.key_record(data["hash"])))
    # a disabled key is refused as such by the proxy (401 key_disabled), not as a suspension
    assert record.status == "disabled" and record.credit_limit_micros is None

    for bad in ({"limit": -1}, {"limit_reset": "hourly"}, {"expires_at": "2001-01-01T00:00Z"},
                {"expires_at": "2030-01-01T00:00"}, {"disabled": "yes"}, {"name": ""}):
        r = await web.client.patch(f"/api/v1/keys/{data['hash']}", headers=headers, json=bad)
        assert r.status == 400, bad

    r = await web.client.delete(f"/api/v1/keys/{data['hash']}", headers=headers)
    assert r.status == 200
    record = KeyRecord.decode(await redis.get(web.settings.names.key_record(data["hash"])))
    assert record.status == "revoked"
    assert (await web.client.get(f"/api/v1/keys/{data['hash']}")).status == 404
    assert (await (await web.client.get("/api/v1/keys")).json())["data"] == []


async def test_a_key_named_like_markup_is_stored_and_returned_as_text(web: Web) -> None:
    _, headers = await _signed_in(web)
    name = "<img src=x onerror=alert(1)>"
    created = await _create(web, headers, name=name)
    r = await web.client.get(f"/api/v1/keys/{created['data']['hash']}")
    assert r.content_type == "application/json"
    assert (await r.json())["data"]["name"] == name


async def test_key_credits_generation_and_activity_report_what_ingest_stored(
    web: Web, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    me, headers = await _signed_in(web)
    account = me["account_id"]
    created = await _create(web, headers, name="app", limit=1, limit_reset="daily")
    key, key_id = created["key"], created["data"]["hash"]
    await ledger.credit(pool, redis, web.settings.names, account, "topup", 10_000_000, None)
    events = [make_event(account, key_id=key_id, cost_micros=250_000, prompt_tokens=10,
                         completion_tokens=20, reasoning_tokens=3, cached_tokens=4),
              make_event(account, key_id=key_id, cost_micros=50_000, stream=False,
                         outcome="client_cancelled", status=499)]
    for event in events:
        await redis.xadd(web.settings.names.events, {STREAM_FIELD: event.encode()})
    consumer = Consumer(web.settings, pool, redis, Metrics())
    stored = 0
    for _ in range(20):  # a hang guard; one batch normally takes both
        stored += (await consumer.run_once()).inserted
        if stored == 2:
            break
    assert stored == 2

    r = await web.client.get("/api/v1/key", headers=_bearer(key))
    data = (await r.json())["data"]
    assert (data["usage"], data["usage_daily"], data["limit"]) == (0.3, 0.3, 1.0)
    assert data["limit_remaining"] == pytest.approx(0.7) and data["limit_reset"] == "daily"
    assert data["is_management_key"] is False

    credits = (await (await web.client.get("/api/v1/credits", headers=_bearer(key))).json())
    assert credits["data"] == {"total_credits": 10.0, "total_usage": 0.3}

    r = await web.client.get(f"/api/v1/generation?id={events[0].id}", headers=_bearer(key))
    gen = (await r.json())["data"]
    assert (gen["id"], gen["model"], gen["provider_name"], gen["streamed"]) == (
        events[0].id, "gpt-4o-mini-2024-07-18", "openai", True)
    assert (gen["tokens_prompt"], gen["tokens_completion"], gen["native_tokens_reasoning"],
            gen["native_tokens_cached"], gen["total_cost"]) == (10, 20, 3, 4, 0.25)
    assert gen["latency"] == 1000.0 and gen["time_to_first_token"] == 250.0
    second = await web.client.get(f"/api/v1/generation?id={events[1].id}")
    assert (await second.json())["data"]["cancelled"] is True

    activity = (await (await web.client.get("/api/v1/activity")).json())["data"]
    assert len(activity) == 1
    row = activity[0]
    assert (row["date"], row["model"], row["requests"]) == (
        datetime.now(UTC).date().isoformat(), "gpt-4o-mini-2024-07-18", 2)
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage"]) == (22, 54, 0.3)


async def test_inference_keys_read_and_management_keys_manage(web: Web) -> None:
    _, headers = await _signed_in(web)
    inference = (await _create(web, headers, name="llm"))["key"]
    r = await web.client.post("/api/v1/keys", json={"name": "x"}, headers=_bearer(inference))
    assert r.status == 403
    assert (await web.client.get("/api/v1/keys", headers=_bearer(inference))).status == 403
    management = await _create(web, headers, name="ops", management=True)
    assert management["data"]["management"] is True
    mk = _bearer(management["key"])
    made = await web.client.post("/api/v1/keys", json={"name": "from-ops"}, headers=mk)
    assert made.status == 201  # no CSRF: a bearer key is not an ambient credential
    r = await web.client.post("/api/v1/keys", json={"management": True}, headers=mk)
    assert r.status == 403
    for bad in ("qnp_notakey", "qnp_" + "a" * 12 + "_" + "b" * 38, "Bearer"):
        r = await web.client.get("/api/v1/credits", headers=_bearer(bad))
        assert r.status == 401


async def test_a_management_key_is_never_published_to_the_proxy(
    web: Web, redis: aioredis.Redis
) -> None:
    _, headers = await _signed_in(web)
    management = await _create(web, headers, name="ops", management=True)
    assert await redis.get(web.settings.names.key_record(management["data"]["hash"])) is None


async def test_a_warm_api_key_costs_no_bcrypt(web: Web) -> None:
    _, headers = await _signed_in(web)
    key = (await _create(web, headers, name="hot"))["key"]
    auth = web.client.server.app[KEYS]  # type: ignore[union-attr]
    await web.client.get("/api/v1/credits", headers=_bearer(key))
    before = auth.verifications
    for _ in range(10):
        assert (await web.client.get("/api/v1/credits", headers=_bearer(key))).status == 200
    assert auth.verifications == before


async def test_another_accounts_keys_and_requests_are_not_found(
    web: Web, pool: asyncpg.Pool, redis: aioredis.Redis
) -> None:
    owner, owner_headers = await _signed_in(web)
    theirs = await _create(web, owner_headers, name="theirs")
    event = make_event(owner["account_id"], key_id=theirs["data"]["hash"])
    await redis.xadd(web.settings.names.events, {STREAM_FIELD: event.encode()})
    consumer = Consumer(web.settings, pool, redis, Metrics())
    for _ in range(20):
        if (await consumer.run_once()).inserted:
            break
    web.client.session.cookie_jar.clear()
    _, headers = await _signed_in(web)
    mine = await _create(web, headers, name="mine", management=True)
    h = theirs["data"]["hash"]
    for auth in (headers, _bearer(mine["key"])):
        for method, path, body in [
            ("GET", f"/api/v1/keys/{h}", None),
            ("PATCH", f"/api/v1/keys/{h}", {"name": "stolen"}),
            ("DELETE", f"/api/v1/keys/{h}", None),
            ("GET", f"/api/v1/generation?id={event.id}", None),
        ]:
            r = await web.client.request(method, path, json=body, headers=auth)
            assert r.status == 404, (method, path, await r.text())
        listed = await web.client.get("/api/v1/keys", headers=auth)
        assert h not in await listed.text()
        activity = await web.client.get("/api/v1/activity", headers=auth)
        assert (await activity.json())["data"] == []
    still = await pool.fetchval("SELECT name FROM api_keys WHERE key_id = $1", h)
    assert still == "theirs"


async def test_a_hot_key_document_costs_one_query_a_second(
    web: Web, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, headers = await _signed_in(web)
    key = (await _create(web, headers, name="hot"))["key"]
    calls = 0
    real = account_api.keys.get_key

    async def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real(*args)

    monkeypatch.setattr(account_api.keys, "get_key", counting)
    monkeypatch.setattr(account_api, "KEY_DOC_TTL_S", 3600.0)  # no clock in the test
    bodies = set()
    for _ in range(10):
        r = await web.client.get("/api/v1/key", headers=_bearer(key))
        bodies.add(await r.read())
    assert calls == 1 and len(bodies) == 1



async def test_requests_that_miss_the_key_document_together_share_one_query(
    web: Web, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When the cached document expires, every request in flight at that moment used to
    # read Postgres itself (128 reads a second at 32 connections): now the first reads
    # and the others wait for its answer.
    _, headers = await _signed_in(web)
    key = (await _create(web, headers, name="herd"))["key"]
    calls = 0
    real = account_api.keys.get_key
    release = asyncio.Event()

    async def slow(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        await release.wait()  # every request below arrives while this read is out
        return await real(*args)

    monkeypatch.setattr(account_api.keys, "get_key", slow)
    # A request arriving late (a busy machine) finds the document cached, never a
    # second read: the count holds however the requests are scheduled.
    monkeypatch.setattr(account_api, "KEY_DOC_TTL_S", 3600.0)

    async def get() -> tuple[int, bytes]:
        r = await web.client.get("/api/v1/key", headers=_bearer(key))
        return r.status, await r.read()

    requests = [asyncio.create_task(get()) for _ in range(20)]
    for _ in range(200):  # hang guard: until the first read is out
        if calls:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the rest arrive meanwhile (on the old code: 20 reads)
    release.set()
    answers = await asyncio.gather(*requests)
    assert calls == 1
    assert {status for status, _ in answers} == {200} and len({b for _, b in answers}) == 1
