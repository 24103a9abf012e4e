"""Correcting the e-mail address (issue 14): a signed, expiring, single-use link goes
to the new address; the address changes only when the signed-in user confirms it; a
link is nothing to another user; an address another account holds is refused."""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest

from control_plane.errors import NotFound
from control_plane.privacy import email_change
from tests.control_plane.privacy.people import Person, person
from tests.control_plane.web.conftest import SESSION_SECRET, Web


async def _link(pool: asyncpg.Pool, who: Person, to: str) -> str:
    body = await pool.fetchval(
        "SELECT body FROM email_outbox WHERE account_id = $1 AND template = "
        "'email_change_confirm' AND to_address = $2 ORDER BY id DESC LIMIT 1",
        uuid.UUID(who.me["account_id"]), to)
    assert body is not None
    found = re.search(r"(http://\S+/settings/privacy/email/confirm\?token=\S+)", body)
    assert found is not None and found.group(1).startswith(who.web.origin)
    return found.group(1)[len(who.web.origin):]


async def _email(pool: asyncpg.Pool, who: Person) -> str:
    found: str = await pool.fetchval(
        "SELECT u.email FROM users u JOIN memberships m ON m.user_id = u.id "
        "WHERE m.account_id = $1", uuid.UUID(who.me["account_id"]))
    return found


async def test_the_new_address_is_used_only_once_its_user_confirms_the_link(
    web: Web, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = await person(web), await person(web)
    new = f"new-{secrets.token_hex(4)}@example.test"
    r = await a.form("/settings/privacy/email", email=new)
    assert r.status == 303 and r.headers["Location"].endswith("done=email")
    link = await _link(pool, a, new)
    token = parse_qs(urlsplit(link).query)["token"][0]
    assert await _email(pool, a) == a.email  # asking changes nothing

    # Another user holding the link: not found, nothing shown, nothing changed.
    r = await web.client.get(link, headers=b.browser)
    assert r.status == 404 and new not in await r.text()
    r = await b.form("/settings/privacy/email/confirm", token=token)
    assert r.status == 404
    r = await web.client.get(link, allow_redirects=False)
    assert r.status == 302 and r.headers["Location"].startswith("/signin")

    # Opening it shows the address and a button; only the POST changes it.
    assert new in await a.page(link)
    assert await _email(pool, a) == a.email
    r = await a.form("/settings/privacy/email/confirm", token=token[:-2] + "xx")
    assert r.status == 404  # tampered
    r = await a.form("/settings/privacy/email/confirm", token=token)
    assert r.status == 303 and r.headers["Location"].endswith("done=email-confirmed")
    assert await _email(pool, a) == new
    assert await pool.fetchval("SELECT email_verified FROM users WHERE email = $1", new)
    notice = await pool.fetchrow(
        "SELECT to_address, body FROM email_outbox WHERE template = 'email_changed_notice' "
        "AND account_id = $1", uuid.UUID(a.me["account_id"]))
    assert notice["to_address"] == a.email and new not in notice["body"]
    r = await a.form("/settings/privacy/email/confirm", token=token)
    assert r.status == 404  # single use
    assert [(q["type"], q["handled_by"]) for q in await pool.fetch(
        "SELECT type, handled_by FROM privacy_requests WHERE account_id = $1",
        uuid.UUID(a.me["account_id"]))] == [("correction", "self-service")]

    # Someone else's address: refused when the link is used, never before.
    r = await web.client.post("/api/v1/account/privacy/email", json={"email": b.email},
                              headers=a.api)
    assert r.status == 202
    taken = parse_qs(urlsplit(await _link(pool, a, b.email)).query)["token"][0]
    r = await web.client.post("/api/v1/account/privacy/email/confirm", json={"token": taken},
                              headers=a.api)
    assert r.status == 409 and "another account" in (await r.json())["error"]["message"]
    assert await _email(pool, a) == new and await _email(pool, b) == b.email
    r = await web.client.post("/api/v1/account/privacy/email", json={"email": "no at sign"},
                              headers=a.api)
    assert r.status == 400
    # The test server's access log is aiohttp's; the service's own (control_plane/logs.py)
    # never logs the query string that carries the token.
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
    for secret in (new, a.email, b.email, token):
        assert secret not in ours, secret


async def test_a_link_expires_after_a_day_by_the_injected_clock(
    pool: asyncpg.Pool, account_id: str
) -> None:
    links = email_change.Links(SESSION_SECRET)
    user = uuid.uuid4()
    await pool.execute("INSERT INTO users (id, email, email_verified) VALUES ($1, $2, true)",
                       user, f"old-{user}@example.test")
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    change = await email_change.start(pool, links, "https://qnp.example",
                                      uuid.UUID(account_id), user,
                                      f"fresh-{user}@example.test", now)
    body = await pool.fetchval("SELECT body FROM email_outbox WHERE account_id = $1",
                               uuid.UUID(account_id))
    token = body.split("token=", 1)[1].split()[0]
    later = now + email_change.LINK_TTL
    assert links.read(token, later - timedelta(seconds=1)) == change
    with pytest.raises(NotFound, match="expired"):
        links.read(token, later)
    with pytest.raises(NotFound):
        email_change.Links("another-secret-" + "0" * 20).read(token, now)
    with pytest.raises(NotFound):
        await email_change.confirm(pool, uuid.UUID(account_id), user, change, later)
    await email_change.confirm(pool, uuid.UUID(account_id), user, change,
                               later - timedelta(seconds=1))
    assert await pool.fetchval("SELECT email FROM users WHERE id = $1", user) == \
        f"fresh-{user}@example.test"
