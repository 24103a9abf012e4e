"""Policy clause 11 and clause 6 on an injected clock: staff with the privacy role mark
an account as a child's and it is purged on the next pass, no grace, audited; every
table the registry lists ends as it says (purged rows gone, anonymised rows moved to
one new id); an active account is kept however late the clock; billing records go
after 7 years, an open account's balance carried forward."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from control_plane import accounts, admin_rbac, staff
from control_plane.admin_api import make_app
from control_plane.billing.gateway import StripeGateway
from control_plane.consent import records
from control_plane.errors import Conflict
from control_plane.privacy import deletion, purge
from control_plane.privacy.registry import TABLES, Fate
from control_plane.settings import BillingSettings, Settings
from tests.control_plane.privacy.rows import billing_rows, usage_rows
from tests.control_plane.web.conftest import Web, sign_in_new_user
from tests.support import free_port

NOW = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)


async def _rows_by_table(pool: asyncpg.Pool, account: uuid.UUID, users: list[uuid.UUID]
                         ) -> dict[str, int]:
    counts = {}
    for t in TABLES:
        if t.of_users:
            counts[t.name] = await pool.fetchval(
                f"SELECT count(*) FROM {t.name} WHERE {t.by} = ANY($1::uuid[])",  # noqa: S608
                users)
        else:
            counts[t.name] = await pool.fetchval(
                f"SELECT count(*) FROM {t.name} WHERE {t.by} = $1", account)  # noqa: S608
    return counts


async def test_a_childs_account_is_purged_at_once_and_audited(
        web: Web, pool: asyncpg.Pool, redis: aioredis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_rbac, "ROLES_CACHE_TTL_S", 0.0)  # role changes seen at once
    keeper = await sign_in_new_user(web)  # an active account, kept whatever the clock
    web.client.session.cookie_jar.clear()
    child = await sign_in_new_user(web)
    account = uuid.UUID(child["account_id"])
    user = await pool.fetchval("SELECT user_id FROM memberships WHERE account_id = $1",
                               account)
    r = await web.client.post("/api/v1/keys", json={"name": "homework"}, headers={
        **web.same_origin, "X-CSRF-Token": child["csrf_token"]})
    assert r.status == 201
    await usage_rows(pool, account, (await r.json())["data"]["hash"], 3, NOW)
    await billing_rows(pool, account, NOW, f"child-{account}")
    async with pool.acquire() as conn:
        await records.record(conn, purpose="functional", granted=True, source="banner",
                             policy_version="2026-04", account_id=account)
    web.client.session.cookie_jar.clear()
    officer = await sign_in_new_user(web)
    cookie = next(c for c in web.client.session.cookie_jar if c.key == "__Host-qnp_session")
    as_staff = {"Cookie": f"__Host-qnp_session={cookie.value}",
                "X-CSRF-Token": officer["csrf_token"]}
    before = await _rows_by_table(pool, account, [user])
    assert all(before[t] for t in ("usage_logs", "usage_daily", "credit_ledger",
                                   "consent_records", "api_keys", "users", "audit_log"))

    async with TestClient(TestServer(make_app(web.settings))) as admin:
        child_route = f"/admin/accounts/{account}/child"
        await staff.grant(pool, officer["user"]["email"], "support", "test")
        assert (await admin.post(child_route, headers=as_staff)).status == 403
        await staff.grant(pool, officer["user"]["email"], "privacy", "test")
        r = await admin.post(child_route, headers=as_staff)
        assert r.status == 202, await r.text()
        r = await admin.post(f"/admin/accounts/{account}/resume", headers=as_staff)
        assert r.status == 409  # a deletion is not undone by resuming the account
    assert await pool.fetchval("SELECT count(*) FROM web_sessions WHERE account_id = $1 "
                               "AND revoked_at IS NULL", account) == 0
    with pytest.raises(Conflict):  # no grace, no cancelling
        await deletion.cancel(pool, redis, web.settings.names, account,
                              datetime.now(UTC))

    purger = purge.Purger(redis, web.settings.names, None)
    await purger.run(pool, datetime.now(UTC))  # requests in flight may still settle
    assert await pool.fetchval("SELECT status FROM accounts WHERE id = $1", account) == \
        "deleting"
    # Once they have (20 minutes), the next pass purges: no 7 days of grace.
    assert await purger.run(pool, datetime.now(UTC) + deletion.SETTLE) >= 1
    after = await _rows_by_table(pool, account, [user])
    assert all(n == 0 for n in after.values()), after
    anonymous = await pool.fetchval(
        "SELECT account_id FROM credit_ledger WHERE reference = $1", f"child-{account}")
    moved = await _rows_by_table(pool, anonymous, [])
    # Added by the marking: the request, and its audit rows (the admin API's and its own).
    added = {"privacy_requests": 1, "audit_log": 2}
    for t in TABLES:
        if t.fate is Fate.ANONYMISED:
            assert moved[t.name] == before[t.name] + added.get(t.name, 0), t
    actors = await pool.fetch("SELECT actor, action, target FROM audit_log "
                              "WHERE account_id = $1 ORDER BY id", anonymous)
    officer_id = await pool.fetchval("SELECT id FROM users WHERE email = $1",
                                     officer["user"]["email"])
    assert ("account.child", f"staff:{officer_id}") in {(a["action"], a["actor"])
                                                       for a in actors}
    assert all(str(account) not in a["target"] for a in actors)

    # However late the clock, an account nobody asked to delete is kept.
    assert await purger.run(pool, NOW + timedelta(days=3650)) == 0
    assert await pool.fetchval("SELECT status FROM accounts WHERE id = $1",
                               uuid.UUID(keeper["account_id"])) == "active"


async def test_billing_records_end_after_seven_years_and_balances_carry_forward(
        settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis) -> None:
    open_account = (await accounts.create_account(pool, rclient, settings.names, "old")).id
    gone = uuid.uuid4()  # an account deleted long ago: its billing under an anonymous id
    seven_years = NOW.replace(year=NOW.year - 7)
    old, inside = seven_years - timedelta(days=1), seven_years + timedelta(days=1)
    # Ids grow with time, so the oldest rows hold the lowest ids; the purge reads from
    # there. Rows backdated now need ids below every other test's to be where old rows are.
    rows = [(-6, gone, 7_000_000, old), (-5, gone, -2_000_000, old),
            (-4, open_account, 10_000_000, old), (-3, open_account, -3_000_000, old),
            (-2, open_account, -1_000_000, inside)]
    await pool.executemany(
        "INSERT INTO credit_ledger (id, account_id, kind, amount_micros, reference, "
        "created_at) OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6)",
        [(i, a, "topup" if m > 0 else "adjustment", m, f"old{i}", t) for i, a, m, t in rows])
    await pool.execute("INSERT INTO billing_events (event_id, type, ledger_id, received_at) "
                       "VALUES ('evt_old_h17', 'payment_intent.succeeded', -4, $1)", old)
    await pool.execute(
        "INSERT INTO billing_topups (payment_intent_id, account_id, request_id, "
        "credit_cents, fee_cents, amount_cents, currency, created_at) VALUES "
        "('pi_old_h17', $1, $2, 1000, 0, 1000, 'usd', $3)", open_account, uuid.uuid4(), old)
    # The payment's charge was refunded and disputed back then; an off-session charge too.
    await pool.execute("INSERT INTO billing_charges (charge_id, payment_intent_id, "
                       "account_id) VALUES ('ch_old_h17', 'pi_old_h17', $1)", open_account)
    await pool.execute("INSERT INTO billing_refunds (refund_id, charge_id, amount_cents) "
                       "VALUES ('re_old_h17', 'ch_old_h17', 100)")
    await pool.execute(
        "INSERT INTO billing_disputes (dispute_id, charge_id, account_id, amount_cents, "
        "reason, status) VALUES ('dp_old_h17', 'ch_old_h17', $1, 100, 'fraudulent', "
        "'needs_response')", open_account)
    await pool.execute(
        "INSERT INTO auto_topup_charges (account_id, crossing, credit_cents, fee_cents, "
        "payment_method_id, status, created_at) VALUES ($1, 1, 500, 0, 'pm_old_h17', "
        "'succeeded', $2), ($1, 2, 500, 0, 'pm_new_h17', 'succeeded', $3)",
        open_account, old, inside)
    balance = await pool.fetchval(
        "SELECT sum(amount_micros) FROM credit_ledger WHERE account_id = $1", open_account)

    assert await purge.expire_billing(pool, NOW) == 4
    left = await pool.fetch("SELECT id, kind, amount_micros FROM credit_ledger "
                            "WHERE account_id = ANY($1::uuid[]) ORDER BY id",
                            [open_account, gone])
    assert [r["id"] for r in left][:1] == [-2]  # the row inside 7 years is kept
    assert [(r["kind"], r["amount_micros"]) for r in left[1:]] == [("adjustment", 7_000_000)]
    assert sum(r["amount_micros"] for r in left) == balance  # the balance is unchanged
    assert await pool.fetchval("SELECT count(*) FROM billing_events "
                               "WHERE event_id = 'evt_old_h17'") == 0
    assert await pool.fetchval("SELECT count(*) FROM billing_topups "
                               "WHERE payment_intent_id = 'pi_old_h17'") == 0
    for table, column, value in (("billing_charges", "charge_id", "ch_old_h17"),
                                 ("billing_refunds", "refund_id", "re_old_h17"),
                                 ("billing_disputes", "dispute_id", "dp_old_h17")):
        assert await pool.fetchval(
            f"SELECT count(*) FROM {table} WHERE {column} = $1", value) == 0, table  # noqa: S608
    assert [r["crossing"] for r in await pool.fetch(
        "SELECT crossing FROM auto_topup_charges WHERE account_id = $1", open_account)] == [2]
    assert await purge.expire_billing(pool, NOW) == 0  # nothing more: idempotent


async def test_the_purge_waits_while_the_stripe_customer_cannot_be_deleted(
        settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    account = (await accounts.create_account(pool, rclient, settings.names, "paying")).id
    await pool.execute("INSERT INTO billing_customers (account_id, stripe_customer_id) "
                       "VALUES ($1, $2)", account, f"cus_{account.hex[:14]}")
    await deletion.request(pool, rclient, settings.names, account, NOW, timedelta(0))
    due = NOW + deletion.SETTLE
    # Stripe not configured here; then configured but unreachable (nothing listens on the port).
    unreachable = StripeGateway(BillingSettings(
        stripe_secret_key="sk_test_x", stripe_api_base=f"http://127.0.0.1:{free_port()}",
        stripe_timeout_s=2.0))
    try:
        for stripe in (None, unreachable):
            assert await purge.Purger(rclient, settings.names, stripe).run(pool, due) == 0
            assert await pool.fetchval("SELECT status FROM accounts WHERE id = $1",
                                       account) == "deleting"
    finally:
        await unreachable.close()
    postponed = [r.getMessage() for r in caplog.records if "purge postponed" in r.getMessage()]
    assert len(postponed) == 2 and all(str(account) in m for m in postponed)
