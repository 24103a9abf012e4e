"""Deleting an account from the web: a fresh sign-in (prompt=login, max_age=0) and the
typed words are required; at once every key is revoked and published, every session
ends, the account is no longer active, unsent mail is cancelled and no new mail is
queued, and an open deletion request is recorded; another account is untouched; a
sign-in in the grace period can keep the account (its keys stay revoked)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import redis.asyncio as aioredis

from control_plane.mail import outbox
from control_plane.privacy import requests
from control_plane.web.guard import RESTORE_COOKIE
from control_plane.web.state import STORES
from shared.apikeys import KeyRecord
from tests.control_plane.privacy.deletion_flows import (
    CONFIRM,
    age_sessions,
    csrf_headers,
    delete_account,
    fetchval,
    sign_in_again,
)
from tests.control_plane.web.conftest import Web, new_person, query_of, sign_in_new_user


async def _key(web: Web, headers: dict[str, str]) -> str:
    r = await web.client.post("/api/v1/keys", json={"name": "ci"}, headers=headers)
    assert r.status == 201, await r.text()
    key_id: str = (await r.json())["data"]["hash"]
    return key_id


async def _queue_mail(web: Web, account_id: str, to: str) -> int | None:
    async with web.client.server.app[STORES].pool.acquire() as conn:
        return await outbox.enqueue(conn, to_address=to, kind="transactional",
                                    template="receipt", subject="Receipt", body="Thanks",
                                    account_id=account_id)


async def test_deleting_needs_a_fresh_sign_in_and_the_typed_words(
        web: Web, redis: aioredis.Redis) -> None:
    person = new_person()
    me = await sign_in_new_user(web, person)
    account = me["account_id"]
    headers = await csrf_headers(web)
    key_id = await _key(web, headers)
    r = await web.client.post("/api/v1/keys", json={"name": "ops", "management": True},
                              headers=headers)
    bearer = {"Authorization": "Bearer " + (await r.json())["key"]}

    # An API key, even a management one, never deletes the account.
    r = await web.client.post("/api/v1/account/deletion", json=CONFIRM, headers=bearer)
    assert r.status == 403, await r.text()
    # Signed in 10 minutes ago: not fresh. The API says what to do, the form redirects
    # to the page, and the page offers a sign-in that forces the provider to ask again.
    await age_sessions(web, account, 10)
    r = await web.client.post("/api/v1/account/deletion", json=CONFIRM, headers=headers)
    assert r.status == 403 and "sign in again" in (await r.json())["error"]["message"]
    r = await web.client.post("/settings/deletion", headers=headers,
                              data={**CONFIRM, "csrf_token": headers["X-CSRF-Token"]},
                              allow_redirects=False)
    assert (r.status, r.headers["Location"]) == (302, "/settings/deletion")
    page = await (await web.client.get("/settings/deletion")).text()
    assert "/auth/dev/start?fresh=1&amp;next=%2Fsettings%2Fdeletion" in page
    assert 'name="confirm"' not in page
    start = await web.client.get("/auth/dev/start", allow_redirects=False,
                                 params={"next": "/settings/deletion", "fresh": "1"})
    asked = query_of(start.headers["Location"])
    assert (asked["prompt"], asked["max_age"]) == ("login", "0")

    r = await sign_in_again(web, person, fresh=True)
    assert (r.status, r.headers["Location"]) == (302, "/settings/deletion")
    assert 'name="confirm"' in await (await web.client.get("/settings/deletion")).text()
    headers = await csrf_headers(web)
    for wrong in ({}, {"confirm": "delete"}, {"confirm": 1}):
        r = await web.client.post("/api/v1/account/deletion", json=wrong, headers=headers)
        assert r.status == 400 and "delete my account" in (await r.json())["error"]["message"]
    r = await web.client.post("/settings/deletion", headers=headers, data={
        "confirm": "yes", "csrf_token": headers["X-CSRF-Token"]})
    assert r.status == 400 and 'role="alert"' in await r.text()  # the page, with why
    for body in (b"{", b"[]"):  # not JSON, not an object: the API's own 400
        r = await web.client.post("/api/v1/account/deletion", data=body, headers={
            **headers, "Content-Type": "application/json"})
        assert (r.status, (await r.json())["error"]["code"]) == (400, 400)
    # A message queued before is cancelled; none is queued after.
    queued = await _queue_mail(web, account, person["email"])
    assert queued is not None

    done = await delete_account(web, headers)
    assert done["status"] == "deleting"

    assert (await web.client.get("/api/v1/session")).status == 401  # this session ended
    assert await fetchval(web, "SELECT count(*) FROM web_sessions WHERE account_id = $1 "
                          "AND revoked_at IS NULL", uuid.UUID(account)) == 0
    assert await fetchval(web, "SELECT status FROM accounts WHERE id = $1",
                          uuid.UUID(account)) == "deleting"
    record = KeyRecord.decode(await redis.get(web.settings.names.key_record(key_id)))
    assert record.status == "revoked"
    assert await fetchval(web, "SELECT count(*) FROM api_keys WHERE account_id = $1 "
                          "AND status = 'active'", uuid.UUID(account)) == 0
    state = await redis.hget(web.settings.names.account_state(account), "status")
    assert state == b"suspended"  # what the proxy refuses
    assert await fetchval(web, "SELECT next_attempt_at FROM email_outbox WHERE id = $1",
                          queued) is None
    assert await _queue_mail(web, account, person["email"]) is None
    pool = web.client.server.app[STORES].pool
    asked_for = await requests.of_account(pool, uuid.UUID(account))
    assert [(q.type, q.handled_by, q.completed_at) for q in asked_for] == \
        [("deletion", "self-service", None)]
    r = await web.client.post("/api/v1/account/deletion", json=CONFIRM, headers=headers)
    assert r.status == 403  # signed out: this browser has nothing left to act with


async def test_another_account_is_untouched(web: Web) -> None:
    other = await sign_in_new_user(web)
    other_headers = await csrf_headers(web)
    other_key = await _key(web, other_headers)
    web.client.session.cookie_jar.clear()
    await sign_in_new_user(web)
    await delete_account(web, await csrf_headers(web))
    assert await fetchval(web, "SELECT status FROM accounts WHERE id = $1",
                          uuid.UUID(other["account_id"])) == "active"
    assert await fetchval(web, "SELECT status FROM api_keys WHERE key_id = $1",
                          other_key) == "active"
    assert await fetchval(web, "SELECT count(*) FROM web_sessions WHERE account_id = $1 "
                          "AND revoked_at IS NULL", uuid.UUID(other["account_id"])) == 1


async def test_a_sign_in_in_the_grace_period_keeps_the_account_but_not_its_keys(
        web: Web) -> None:
    person = new_person()
    me = await sign_in_new_user(web, person)
    account = uuid.UUID(me["account_id"])
    key_id = await _key(web, await csrf_headers(web))
    await delete_account(web, await csrf_headers(web))

    # Without the restore cookie, cancelling is refused.
    r = await web.client.delete("/api/v1/account/deletion", headers=web.same_origin)
    assert r.status == 403, await r.text()
    r = await sign_in_again(web, person)
    assert (r.status, r.headers["Location"]) == (302, "/account/restore")
    assert (await web.client.get("/api/v1/session")).status == 401  # no session yet
    page = await (await web.client.get("/account/restore")).text()
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token and "Keep my account" in page
    r = await web.client.post("/account/restore", data={"csrf_token": token.group(1)},
                              headers=web.same_origin, allow_redirects=False)
    assert (r.status, r.headers["Location"]) == (302, "/settings"), await r.text()
    assert RESTORE_COOKIE not in {c.key for c in web.client.session.cookie_jar}

    assert (await web.client.get("/api/v1/session")).status == 200
    assert await fetchval(web, "SELECT status FROM accounts WHERE id = $1", account) == \
        "active"
    assert await fetchval(web, "SELECT status FROM api_keys WHERE key_id = $1",
                          key_id) == "revoked"
    pool = web.client.server.app[STORES].pool
    outcome: list[Any] = [q.outcome for q in await requests.of_account(pool, account)]
    assert outcome == ["withdrawn"]
    # The restore cookie was read once: replaying the form does nothing more.
    r = await web.client.post("/account/restore", data={"csrf_token": token.group(1)},
                              headers=web.same_origin, allow_redirects=False)
    assert r.status == 403
