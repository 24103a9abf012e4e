"""The dashboard's pages over HTTP (the browser journey is in tests/browser): sign-in
first, CSRF on every form, the secret shown once and escaped names, another account's
key not found, usage filters in the URL, keyset pages without gaps or repeats, exports
of exactly what the filters select, and pages with no inline script or style."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis

from control_plane import ledger
from control_plane.connections import open_pool, open_redis
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from control_plane.usage_history import PAGE_SIZE
from shared.events import STREAM_FIELD, Event
from tests.control_plane.factories import days_ago, make_event
from tests.control_plane.web.conftest import Web, serve_web, sign_in_new_user
from tests.support import free_port

XSS_NAME = "<img src=x onerror=alert(1)>"


@pytest.fixture
async def stores(web: Web) -> AsyncIterator[tuple[asyncpg.Pool, aioredis.Redis]]:
    pool = await open_pool(web.settings, min_size=1, max_size=2)
    redis = open_redis(web.settings)
    yield pool, redis
    await redis.aclose()
    await pool.close()


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found
    return found.group(1)


async def _create(web: Web, name: str, **form: str) -> tuple[int, str]:
    token = _csrf(await (await web.client.get("/keys")).text())
    r = await web.client.post("/keys", data={"csrf_token": token, "name": name, **form},
                              headers=web.same_origin)
    return r.status, await r.text()


async def _ingest(web: Web, stores: tuple[asyncpg.Pool, aioredis.Redis],
                  events: list[Event]) -> None:
    pool, redis = stores
    for e in events:
        await redis.xadd(web.settings.names.events, {STREAM_FIELD: e.encode()})
    consumer = Consumer(web.settings, pool, redis, Metrics())
    for _ in range(20):  # bounded: a few batches of 500
        if (await consumer.run_once()).read == 0:
            break


async def test_pages_need_a_session_and_come_back_after_sign_in(web: Web) -> None:
    for path in ("/", "/keys", "/usage?model=a", "/usage/export.csv"):
        r = await web.client.get(path, allow_redirects=False)
        assert r.status == 302, path
        assert r.headers["Location"].startswith("/signin?next=" + path.split("?")[0]), path


async def test_a_key_is_created_with_csrf_shown_once_and_its_name_escaped(web: Web) -> None:
    await sign_in_new_user(web)
    r = await web.client.post("/keys", data={"name": "no token"}, headers=web.same_origin)
    assert r.status == 403
    status, page = await _create(web, XSS_NAME, limit="2.5", limit_reset="weekly",
                                 expires=(datetime.now(UTC) + timedelta(days=3)).date()
                                 .isoformat())
    assert status == 201
    secret = re.search(r'data-testid="new-secret">(qnp_[^<]+)<', page)
    assert secret
    assert XSS_NAME not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    listing = await (await web.client.get("/keys")).text()
    assert secret.group(1) not in listing  # shown once only
    assert "$2.50 weekly" in listing
    status, page = await _create(web, "bad", limit="ten dollars")
    assert status == 400 and "dollar amount" in page


async def test_another_accounts_key_cannot_be_revoked_from_here(web: Web) -> None:
    await sign_in_new_user(web)
    _, page = await _create(web, "mine")
    key_id = re.search(r'data-key="([a-z0-9]+)"', page)
    assert key_id
    port = free_port()  # a second browser: its own server, cookie jar and person
    async with serve_web(replace(web.settings, web_port=port,
                                 public_url=f"http://127.0.0.1:{port}")) as w2:
        await sign_in_new_user(w2)
        token = _csrf(await (await w2.client.get("/keys")).text())
        r = await w2.client.get(f"/keys/{key_id.group(1)}/revoke")
        assert r.status == 404
        r = await w2.client.post(f"/keys/{key_id.group(1)}/revoke",
                                 data={"csrf_token": token}, headers=w2.same_origin)
        assert r.status == 404
    listing = await (await web.client.get("/keys")).text()
    assert "status-active" in listing


async def test_usage_pages_follow_the_filters_and_pages_neither_skip_nor_repeat(
    web: Web, stores: tuple[asyncpg.Pool, aioredis.Redis],
) -> None:
    me = await sign_in_new_user(web)
    account = me["account_id"]
    n = PAGE_SIZE * 2 + 7
    events = [make_event(account, requested_model="m-a" if i % 2 else "m-b", served_model=None,
                         received_at_us=days_ago(0) - i * 1000, cost_micros=10)
              for i in range(n)]
    old = make_event(account, received_at_us=days_ago(3), requested_model="m-old",
                     served_model=None, cost_micros=5)
    await _ingest(web, stores, [*events, old])

    seen: list[str] = []
    path = "/usage"
    for _ in range(10):  # bounded: three pages expected
        page = await (await web.client.get(path)).text()
        seen += re.findall(r'data-request="([0-9a-f-]+)"', page)
        older = re.search(r'href="/usage\?([^"]+)" rel="next"', page)
        if older is None:
            break
        path = "/usage?" + older.group(1).replace("&amp;", "&")
    assert len(seen) == n + 1 and len(set(seen)) == n + 1
    assert seen[-1] == old.id  # newest first: the three-day-old request comes last

    page = await (await web.client.get("/usage?model=m-a")).text()
    assert re.search(r'data-testid="total-requests">(\d+)<', page).group(1) == str(n // 2)
    today = datetime.now(UTC).date().isoformat()
    page = await (await web.client.get(f"/usage?from={today}&to={today}")).text()
    assert "m-old" not in re.findall(r'data-model="([^"]+)"', page)
    r = await web.client.get("/usage?from=yesterday")
    assert r.status == 400

    export = await web.client.get("/usage/export.csv?model=m-b")
    rows = list(csv.DictReader(io.StringIO(await export.text())))
    assert len(rows) == n - n // 2 and {r["model"] for r in rows} == {"m-b"}
    assert "source_ip" not in rows[0] and int(rows[0]["cost_micros"]) == 10
    first = datetime.fromisoformat(rows[0]["received_at"])  # ISO 8601, UTC
    assert rows[0]["received_at"].endswith("Z") and first.tzinfo is not None
    assert [r["received_at"] for r in rows] == sorted(r["received_at"] for r in rows)
    data = await (await web.client.get(f"/usage/export.json?from={today}")).json()
    assert len(data) == n and {d["id"] for d in data} == {e.id for e in events}


async def test_pages_carry_no_inline_script_or_style_and_assets_are_ours(web: Web) -> None:
    await sign_in_new_user(web)
    await _create(web, "k")
    for path in ("/", "/keys", "/usage"):
        r = await web.client.get(path)
        page = await r.text()
        assert r.status == 200 and "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert re.findall(r"<script(?![^>]*\ssrc=\"/static/)", page) == [], path
        assert " style=" not in page and "<style" not in page, path
        assert re.findall(r'(?:src|href)="(?:https?:)?//', page) == [], path
    for asset, kind in (("app.css", "text/css"), ("app.js", "javascript")):
        r = await web.client.get(f"/static/{asset}")
        assert r.status == 200 and kind in r.headers["Content-Type"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"


async def test_editing_a_key_changes_only_what_was_changed_and_keeps_its_usage(
    web: Web, stores: tuple[asyncpg.Pool, aioredis.Redis],
) -> None:
    me = await sign_in_new_user(web)
    _, page = await _create(web, "edit me", limit="1234.567891")
    key_id = re.search(r'data-key="([a-z0-9]+)"', page)
    assert key_id
    kid = key_id.group(1)
    pool, _ = stores
    # An expiry set through the API at noon, which the form shows as a date.
    noon = (datetime.now(UTC) + timedelta(days=5)).replace(hour=12, minute=0, second=0,
                                                          microsecond=0)
    await pool.execute("UPDATE api_keys SET expires_at = $1 WHERE key_id = $2", noon, kid)
    await _ingest(web, stores, [make_event(me["account_id"], key_id=kid, cost_micros=77)])
    form = await (await web.client.get(f"/keys/{kid}/edit")).text()
    assert 'value="1234.567891"' in form  # the limit exactly as set
    fields = dict(re.findall(r'name="(csrf_token|name|limit|expires)"[^>]*value="([^"]*)"',
                             form))
    r = await web.client.post(f"/keys/{kid}/edit", headers=web.same_origin,
                              data={**fields, "limit": "9", "limit_reset": "daily"},
                              allow_redirects=False)
    assert r.status == 303, await r.text()
    row = await pool.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", kid)
    assert (row["name"], row["credit_limit_micros"], row["limit_reset"], row["expires_at"],
            row["disabled"]) == ("edit me", 9_000_000, "daily", noon, False)
    listing = await (await web.client.get("/keys")).text()
    assert "$9.00 daily" in listing and "$0.000077" in listing  # usage kept
    r = await web.client.post(f"/keys/{kid}/edit", headers=web.same_origin,
                              data={**fields, "limit": "lots"})
    assert r.status == 400 and "dollar amount" in await r.text()
    r = await web.client.post(f"/keys/{kid}/edit", data={"name": "x"},
                              headers=web.same_origin)
    assert r.status == 403  # no CSRF token


async def test_the_overview_balance_is_live_and_falls_back_to_the_ledger(
    web: Web, stores: tuple[asyncpg.Pool, aioredis.Redis],
) -> None:
    me = await sign_in_new_user(web)
    pool, redis = stores
    names = web.settings.names
    await ledger.credit(pool, redis, names, me["account_id"], "topup", 5_000_000, None)

    def balance(page: str) -> str:
        found = re.search(r'data-testid="balance">([^<]+)<', page)
        assert found
        return found.group(1)

    assert balance(await (await web.client.get("/")).text()) == "$5.00"
    # A request in flight holds $1 of the live balance: still $5.00 until it settles.
    await redis.hincrby(names.account_state(me["account_id"]), "bal", -1_000_000)
    await redis.hset(names.account_reservations(me["account_id"]), "req-1", 1_000_000)
    assert balance(await (await web.client.get("/")).text()) == "$5.00"
    # It settled at $0.25 (the proxy settles live; ingest's debit comes later).
    await redis.hincrby(names.account_state(me["account_id"]), "bal", 750_000)
    await redis.hdel(names.account_reservations(me["account_id"]), "req-1")
    assert balance(await (await web.client.get("/")).text()) == "$4.75"
    await redis.delete(names.account_state(me["account_id"]))  # no live state: the ledger
    assert balance(await (await web.client.get("/")).text()) == "$5.00"


async def test_credits_show_top_ups_and_refunds_not_each_debit_and_usage_by_day(
    web: Web, stores: tuple[asyncpg.Pool, aioredis.Redis],
) -> None:
    me = await sign_in_new_user(web)
    pool, redis = stores
    names, account = web.settings.names, me["account_id"]
    await ledger.credit(pool, redis, names, account, "topup", 5_000_000, "pay_1")
    await ledger.credit(pool, redis, names, account, "refund", 250_000, "<b>r</b>")
    await _ingest(web, stores, [make_event(account, cost_micros=100_000),
                                make_event(account, cost_micros=50_000,
                                           received_at_us=days_ago(2))])
    page = await (await web.client.get("/credits")).text()
    assert re.findall(r'data-kind="([a-z]+)"', page) == ["refund", "topup"]
    assert "&lt;b&gt;r&lt;/b&gt;" in page and "<b>r</b>" not in page
    today = datetime.now(UTC).date()
    assert re.findall(r'<tr data-day="([0-9-]+)"><td>[0-9-]+</td><td>(\d+)</td>', page) == [
        (today.isoformat(), "1"), ((today - timedelta(days=2)).isoformat(), "1")]
    # These events never went through a proxy, so the live balance never saw them; with
    # no live state the page shows the ledger, debits included.
    await redis.delete(names.account_state(account))
    page = await (await web.client.get("/credits")).text()
    assert re.search(r'data-testid="credits-balance">\$([0-9.]+)<', page).group(1) == "5.10"


async def test_settings_list_sessions_and_sign_out_everywhere_ends_them(web: Web) -> None:
    me = await sign_in_new_user(web)
    page = await (await web.client.get("/settings")).text()
    assert me["user"]["email"] in page and "Dev sign-in" in page
    assert page.count("<tr data-session>") == 1 and "(this browser)" in page
    r = await web.client.post("/settings/signout-everywhere", data={"name": "x"},
                              headers=web.same_origin, allow_redirects=False)
    assert r.status == 403  # no CSRF token
    r = await web.client.post("/settings/signout-everywhere",
                              data={"csrf_token": _csrf(page)}, headers=web.same_origin,
                              allow_redirects=False)
    assert r.status == 303 and r.headers["Location"] == "/signin"
    r = await web.client.get("/settings", allow_redirects=False)
    assert r.status == 302 and r.headers["Location"].startswith("/signin")  # cookie gone
    assert (await web.client.get("/api/v1/session")).status == 401
