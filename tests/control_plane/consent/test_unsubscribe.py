"""Marketing e-mail (issue 15): queued only with marketing_email consent and not for a
restricted account, delivered through the real sender and aiosmtpd with RFC 8058's
headers; the one-click link works without signing in, once (a second POST changes
nothing and says so), and cannot be forged for another account."""

from __future__ import annotations

import re
import uuid

import aiohttp
import asyncpg

from control_plane.consent import records
from control_plane.consent.unsubscribe import account_of, make_token
from control_plane.mail.marketing import queue_marketing
from control_plane.mail.sender import Sender
from tests.control_plane.mail.conftest import SmtpServer
from tests.control_plane.web.conftest import SESSION_SECRET, Web, sign_in_new_user

NEWS = {"template": "news", "subject": "What is new at QNP", "body": "Gemini 3 is in.\n"}


async def _queue(web: Web, pool: asyncpg.Pool, account: uuid.UUID) -> int | None:
    async with pool.acquire() as conn:
        return await queue_marketing(conn, account, settings=web.settings, **NEWS)


async def _withdrawals(pool: asyncpg.Pool, account: uuid.UUID) -> list[str]:
    return [r.source for r in await records.history(pool, account)
            if r.purpose == "marketing_email" and not r.granted]


async def test_marketing_mail_needs_consent_and_unsubscribes_in_one_click_once(
    web: Web, outbox_pool: asyncpg.Pool, smtp: SmtpServer
) -> None:
    pool = outbox_pool
    me = await sign_in_new_user(web)
    account = uuid.UUID(me["account_id"])
    assert await _queue(web, pool, account) is None  # no consent: nothing queued
    await records.record(pool, purpose="marketing_email", granted=True, source="settings",
                         policy_version="2026-04", account_id=account)
    await pool.execute("UPDATE accounts SET restricted_at = now() WHERE id = $1", account)
    assert await _queue(web, pool, account) is None  # restricted: nothing either
    await pool.execute("UPDATE accounts SET restricted_at = NULL WHERE id = $1", account)
    assert await _queue(web, pool, account) is not None
    assert await Sender(pool, smtp.target, "QNP <no-reply@qnp.test>", poll_s=0.05).drain() == 1
    [message] = smtp.messages()
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    unfolded = re.sub(r"\r?\n[ \t]+", " ", message["List-Unsubscribe"] or "").strip()
    link = re.fullmatch(r"<(\S+)>", unfolded)
    assert link and link.group(1).startswith(web.origin + "/unsubscribe/")
    text = message.get_payload(decode=True)
    assert isinstance(text, bytes) and link.group(1) in text.decode()  # in the text too
    path = link.group(1)[len(web.origin):]

    # A mail client's one-click POST: no cookie, no page of ours, no CSRF token.
    async with aiohttp.ClientSession() as client:
        async with client.get(link.group(1)) as r:  # opening the link changes nothing
            assert r.status == 200 and "Unsubscribe" in await r.text()
        assert await _withdrawals(pool, account) == []
        async with client.post(link.group(1), data="List-Unsubscribe=One-Click",
                               headers={"Content-Type": "application/x-www-form-urlencoded"}
                               ) as r:
            assert r.status == 200 and "You are unsubscribed" in await r.text()
        async with client.post(link.group(1), data="List-Unsubscribe=One-Click") as r:
            assert r.status == 200 and "already unsubscribed; nothing changed" in await r.text()
    assert await _withdrawals(pool, account) == ["unsubscribe"]
    assert await _queue(web, pool, account) is None  # and no more marketing mail

    # Another account's link cannot be made from this one.
    web.client.session.cookie_jar.clear()
    other = uuid.UUID((await sign_in_new_user(web))["account_id"])
    await records.record(pool, purpose="marketing_email", granted=True, source="settings",
                         policy_version="2026-04", account_id=other)
    mac = path.rsplit(".", 1)[1]
    for forged in (f"/unsubscribe/{other.hex}.{mac}", f"/unsubscribe/{other.hex}",
                   path[:-2] + ("AA" if not path.endswith("AA") else "BB"),
                   f"/unsubscribe/{make_token('another secret' * 3, other)}",
                   "/unsubscribe/%C3%A9." + mac):
        for method in ("GET", "POST"):
            r = await web.client.request(method, forged)
            assert r.status == 404, (forged, method, await r.text())
    assert await _withdrawals(pool, other) == []
    assert account_of([SESSION_SECRET], make_token(SESSION_SECRET, other)) == other
    # After a rotation (QNP_SESSION_SECRET_PREVIOUS) links already sent still work.
    rotated = ["a new session secret of 32 chars!", SESSION_SECRET]
    assert account_of(rotated, make_token(SESSION_SECRET, other)) == other
    assert account_of(rotated[:1], make_token(SESSION_SECRET, other)) is None
