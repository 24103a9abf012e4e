"""The policy's pages over HTTP: /privacy for anyone, escaped, with its version and
"Last updated" date; the material-change banner until the person acknowledges it
(a CSRF-checked POST, recorded in acceptances, per person); the sharing page computed
from the account's own requests only, with its jurisdiction's complaint authority;
and the summary page's counts, which are the export's."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from control_plane.consent import records
from control_plane.partitions import create_days
from control_plane.privacy import export, summary
from control_plane.web.state import STORES
from tests.control_plane.policy.conftest import PolicyFixture, add_version, drop_version
from tests.control_plane.privacy.rows import usage_rows
from tests.control_plane.privacy.test_export import _person
from tests.control_plane.web.conftest import Web

BANNER = 'data-testid="policy-banner"'


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found
    return found.group(1)


def _pool(web: Web) -> asyncpg.Pool:
    assert web.client.app is not None
    return web.client.app[STORES].pool


async def test_the_policy_is_served_to_anyone_escaped_with_its_version(web: Web) -> None:
    r = await web.client.get("/privacy")
    assert r.status == 200
    page = await r.text()
    assert 'data-testid="policy-version">2026-04<' in page
    assert 'data-testid="policy-updated">April 2026<' in page
    assert '<h2 id="clause-9-h">9. Your Rights</h2>' in page
    assert "<h3>EU/EEA Residents (GDPR)</h3>" in page
    assert "<li><strong>Strictly Necessary</strong> — HTTP-only JWT" in page
    assert "Brazil&#39;s Lei Geral" in page  # the text is escaped, not trusted as HTML
    assert 'href="/keys"' not in page and BANNER not in page  # signed out: no dashboard
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert (await web.client.get("/privacy/2026-04")).status == 200
    missing = await web.client.get("/privacy/1999-01")
    assert missing.status == 404


async def test_a_material_change_shows_a_banner_until_acknowledged(
        web: Web, material: PolicyFixture) -> None:
    pool = _pool(web)
    me, mine = await _person(web)
    _, theirs = await _person(web)
    page = await (await web.client.get("/", headers=mine)).text()
    assert BANNER in page
    assert material.version in page
    assert "We now &lt;b&gt;explain&lt;/b&gt; more &amp; better" in page  # escaped
    assert BANNER in await (await web.client.get("/privacy", headers=mine)).text()
    token = _csrf(page)

    cookie_only = {"Cookie": mine["Cookie"]}
    r = await web.client.post("/policy/acknowledge", data={"next": "/keys"},
                              headers={**cookie_only, **web.same_origin},
                              allow_redirects=False)
    assert r.status == 403  # no CSRF token
    r = await web.client.post("/policy/acknowledge", data={"csrf_token": token},
                              headers={**cookie_only, "Sec-Fetch-Site": "cross-site"},
                              allow_redirects=False)
    assert r.status == 403  # another site's form
    assert BANNER in await (await web.client.get("/", headers=mine)).text()

    r = await web.client.post("/policy/acknowledge",
                              data={"csrf_token": token, "next": "/keys"},
                              headers={**cookie_only, **web.same_origin},
                              allow_redirects=False)
    assert (r.status, r.headers["Location"]) == (303, "/keys")
    assert await pool.fetchval(
        "SELECT a.policy_version FROM acceptances a JOIN memberships m USING (user_id) "
        "WHERE m.account_id = $1 AND a.what = 'privacy_policy' ORDER BY a.id DESC LIMIT 1",
        uuid.UUID(me["account_id"])) == material.version
    assert BANNER not in await (await web.client.get("/", headers=mine)).text()
    # One person's acknowledgement is theirs: the other account still sees it.
    assert BANNER in await (await web.client.get("/", headers=theirs)).text()
    r = await web.client.post("/policy/acknowledge",
                              data={"csrf_token": token, "next": "//evil.example/"},
                              headers={**cookie_only, **web.same_origin},
                              allow_redirects=False)
    assert r.headers["Location"] == "/"

    minor = await add_version(pool, material=False)  # a later minor change: no banner
    try:
        assert BANNER not in await (await web.client.get("/", headers=mine)).text()
    finally:
        await drop_version(pool, minor.version)


async def _rollups(pool: asyncpg.Pool, account: uuid.UUID) -> None:
    """The account's daily rollups from its logs, as ingest keeps them."""
    await pool.execute(
        "INSERT INTO usage_daily SELECT account_id, (received_at AT TIME ZONE 'UTC')::date,"
        " coalesce(key_id, ''), coalesce(served_model, requested_model, ''), count(*), 0,"
        " sum(prompt_tokens), sum(completion_tokens), 0, 0, 0, sum(cost_micros)"
        " FROM usage_logs WHERE account_id = $1 GROUP BY 1, 2, 3, 4", account)


async def test_the_sharing_page_shows_the_accounts_own_providers_and_its_authority(
        web: Web) -> None:
    pool = _pool(web)
    me, mine = await _person(web)
    other, theirs = await _person(web)
    me_id, other_id = uuid.UUID(me["account_id"]), uuid.UUID(other["account_id"])
    now = datetime.now(UTC)
    # The daily provider totals ingest keeps (tests/control_plane/test_rollups.py proves
    # ingest writes them): two days of openai, one of anthropic; the other account's own.
    yesterday = now - timedelta(days=1)
    for account, day, provider, n in ((me_id, yesterday, "openai", 5),
                                      (me_id, now, "openai", 2),
                                      (me_id, now - timedelta(hours=2), "anthropic", 3),
                                      (other_id, now, "their-secret-provider", 4)):
        await pool.execute(
            "INSERT INTO usage_daily_providers VALUES ($1, $2, $3, $4, $5, $5)",
            account, day.date(), provider, n, day)
    old_day = (now - timedelta(days=60)).date()
    await pool.execute("INSERT INTO usage_daily VALUES ($1, $2, 'k1', 'old-model', 9, 0, "
                       "1, 1, 0, 0, 0, 1)", me_id, old_day)
    await pool.execute("UPDATE accounts SET jurisdiction = 'kvkk' WHERE id = $1", me_id)

    page = await (await web.client.get("/settings/privacy/sharing", headers=mine)).text()
    rows = dict(re.findall(r'<tr data-provider="([^"]+)"><td>[^<]+</td><td>([\d,]+)</td>',
                           page))
    assert rows == {"openai": "7", "anthropic": "3"}
    assert "their-secret-provider" not in page
    assert 'data-model="old-model">old-model: 9 requests' in page
    for name in ("Stripe", "Sentry", "Cloudflare", "Upstream LLM providers"):
        assert f'data-processor="{name}"' in page
    assert "you have not consented, so it receives nothing" in page
    assert "Kişisel Verileri Koruma Kurumu" in page and 'href="https://www.kvkk.gov.tr/"' in page

    await records.record(pool, purpose="analytics", granted=True, source="settings",
                         policy_version="2026-04", account_id=me_id)
    page = await (await web.client.get("/settings/privacy/sharing", headers=mine)).text()
    assert 'data-testid="sentry-state">you have consented' in page
    theirs_page = await (await web.client.get("/settings/privacy/sharing",
                                              headers=theirs)).text()
    assert "their-secret-provider" in theirs_page and 'data-provider="openai"' not in theirs_page
    assert "California Privacy" not in theirs_page  # default jurisdiction: the default entry
    r = await web.client.get("/settings/privacy/sharing", allow_redirects=False)
    assert r.status == 302 and r.headers["Location"].startswith("/signin")


async def test_the_summary_counts_what_the_export_holds(web: Web) -> None:
    assert [s for s in summary.CATEGORIES] == [s for s, _ in export.SECTIONS]
    pool = _pool(web)
    me, mine = await _person(web)
    await _person(web)  # another account, whose rows must not be counted
    me_id = uuid.UUID(me["account_id"])
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await create_days(conn, {(now - timedelta(days=1)).date()})
    await usage_rows(pool, me_id, "k1", 12, now)
    await _rollups(pool, me_id)
    await records.record(pool, purpose="functional", granted=True, source="banner",
                         policy_version="2026-04", account_id=me_id)
    await records.record(pool, purpose="functional", granted=False, source="settings",
                         policy_version="2026-04", account_id=me_id)

    page = await (await web.client.get("/settings/privacy/summary", headers=mine)).text()
    counts = {s: int(n.replace(",", "")) for s, n in re.findall(
        r'<tr data-section="([a-z_]+)">.*?<td data-count>([\d,]+)</td>', page, re.S)}
    doc = orjson.loads(await (await web.client.get("/api/v1/account/export",
                                                   headers=mine)).read())
    exported = {s: 1 if s == "account" else len(doc[s]) for s in counts}
    assert counts == exported
    assert counts["usage_logs"] == 12 and counts["consent_history"] == 2
    assert counts["consents"] == 1
    assert 'data-testid="complaint"' in page
