"""The account's data export (issue 14): one JSON document of schema_version 3 with
every key, every recent request, every billing and privacy row of the account and
nothing of any other account,
downloaded by a session only, recorded as a fulfilled self-service access request,
and written in constant memory however many rows there are."""

from __future__ import annotations

import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from control_plane.partitions import create_days
from control_plane.privacy import export, requests
from control_plane.web.state import STORES
from tests.control_plane.privacy.rows import (
    account_rows,
    billing_rows,
    payment_rows,
    usage_rows,
)
from tests.control_plane.web.conftest import Web, sign_in_new_user

COOKIE = "__Host-qnp_session"
SECTIONS = ["account", "users", "identities", "acceptances", "staff_roles", "email_changes",
            "consents", "consent_history", "policy_notices", "sessions", "keys",
            "usage_logs", "usage_daily", "usage_daily_providers", "ledger",
            "billing_customers", "billing_topups",
            "billing_charges", "billing_refunds", "billing_disputes", "billing_events",
            "auto_topup_settings", "balance_triggers", "auto_topup_charges",
            "privacy_requests", "privacy_request_details", "privacy_objections", "emails",
            "audit"]


async def _person(web: Web) -> tuple[dict[str, Any], dict[str, str]]:
    """A new signed-in person; their session document and headers to act as them."""
    me = await sign_in_new_user(web)
    cookie = next(c for c in web.client.session.cookie_jar if c.key == COOKIE)
    web.client.session.cookie_jar.clear()
    return me, {"Cookie": f"{COOKIE}={cookie.value}", **web.same_origin,
                "X-CSRF-Token": me["csrf_token"]}


async def _key(web: Web, session: dict[str, str], name: str) -> tuple[str, str]:
    r = await web.client.post("/api/v1/keys", json={"name": name, "limit": 2},
                              headers=session)
    assert r.status == 201, await r.text()
    body = await r.json()
    return body["key"], body["data"]["hash"]


async def _export(web: Web, session: dict[str, str]) -> tuple[bytes, dict[str, Any]]:
    r = await web.client.get("/api/v1/account/export", headers=session)
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"].startswith("application/json")
    assert "attachment" in r.headers["Content-Disposition"]
    assert r.headers["Cache-Control"] == "no-store"
    raw = await r.read()
    return raw, orjson.loads(raw)


async def test_the_export_holds_everything_of_the_account_and_nothing_of_another(
    web: Web
) -> None:
    assert web.client.app is not None
    pool = web.client.app[STORES].pool
    me, mine = await _person(web)
    other, theirs = await _person(web)
    me_id, other_id = uuid.UUID(me["account_id"]), uuid.UUID(other["account_id"])
    secret_a, key_a = await _key(web, mine, "laptop")
    _, key_b = await _key(web, mine, "ci")
    r = await web.client.delete(f"/api/v1/keys/{key_b}", headers=mine)
    assert r.status == 200  # a revoked key is still data held: it is exported
    secret_x, key_x = await _key(web, theirs, "theirs")

    now = datetime.now(UTC)
    mine_rows = await usage_rows(pool, me_id, key_a, 250, now)
    their_rows = await usage_rows(pool, other_id, key_x, 20, now)
    old_day = now - timedelta(days=31)
    async with pool.acquire() as conn:
        await create_days(conn, {old_day.date()})
    too_old = await usage_rows(pool, me_id, key_a, 1, old_day)
    await billing_rows(pool, me_id, now, f"pi_{me_id}")
    await billing_rows(pool, other_id, now, f"pi_{other_id}")
    marks = {}
    for account in (me_id, other_id):  # a payment, its reversals, auto top-up, rights
        user = await pool.fetchval(
            "SELECT user_id FROM memberships WHERE account_id = $1", account)
        marks[account] = await account_rows(pool, account, user, now)

    raw, doc = await _export(web, mine)

    assert list(doc) == ["schema_version", "generated_at", "account_id",
                         "usage_logs_since", *SECTIONS]
    assert doc["schema_version"] == export.SCHEMA_VERSION == 3
    assert doc["account_id"] == str(me_id) == doc["account"]["id"]
    assert {k["key_id"]: k["status"] for k in doc["keys"]} == {key_a: "active",
                                                               key_b: "revoked"}
    assert next(k for k in doc["keys"] if k["key_id"] == key_a)["credit_limit_micros"] \
        == 2_000_000
    assert {uuid.UUID(u["id"]) for u in doc["usage_logs"]} == set(mine_rows)
    assert doc["usage_logs"][0]["source_ip"] == "203.0.113.7"
    assert [u["email"] for u in doc["users"]] == [me["user"]["email"]]
    assert len(doc["identities"]) == 1 and doc["identities"][0]["provider"] == "dev"
    assert {a["what"] for a in doc["acceptances"]} == {"age_18", "terms", "privacy_policy"}
    assert len(doc["sessions"]) >= 1 and "id" not in doc["sessions"][0]
    assert [d["requests"] for d in doc["usage_daily"]] == [3]
    assert [(d["provider"], d["requests"]) for d in doc["usage_daily_providers"]] == [
        ("mock-provider", 3)]
    assert [row["reference"] for row in doc["ledger"]] == [f"pi_{me_id}"]
    assert [a["action"] for a in doc["audit"]] == ["credit.grant"]
    assert doc["audit"][0]["detail"] == {}
    # Each section schema_version 3 added holds this account's row, found by its value.
    for section, value in marks[me_id].items():
        assert value in orjson.dumps(doc[section]).decode(), section
    assert doc["account"]["jurisdiction"] == "default"
    assert [r["refund_id"] for r in doc["billing_refunds"]] == [f"re_{me_id.hex}"]
    assert doc["billing_topups"][0]["card_last4"] == "4242"
    assert [t["kind"] for t in doc["balance_triggers"]] == ["auto_topup"]
    assert [o["purpose"] for o in doc["privacy_objections"]] == ["analytics"]
    # Nothing of the other account, and no secret of any key, anywhere in the bytes.
    for absent in (str(other_id), other["user"]["email"], key_x, secret_x, secret_a,
                   other_id.hex, *marks[other_id].values(),
                   *(str(i) for i in their_rows + too_old), "secret_hash", "$2b$"):
        assert absent.encode() not in raw, absent
    assert str(too_old[0]).encode() not in raw  # past the 30 days of request logs

    # The download is a fulfilled self-service access request, in the next export too.
    recorded = await pool.fetch(
        "SELECT type, handled_by, outcome, completed_at FROM privacy_requests "
        "WHERE account_id = $1 AND type = 'access'", me_id)
    assert [(r["type"], r["handled_by"], r["outcome"]) for r in recorded] == [
        ("access", "self-service", "fulfilled")]
    _, again = await _export(web, mine)
    assert [p["type"] for p in again["privacy_requests"]] == ["correction", "access"]
    assert await pool.fetchval("SELECT count(*) FROM privacy_requests WHERE account_id = $1 "
                               "AND type = 'access'", other_id) == 0


async def test_only_a_signed_in_session_downloads_the_export(web: Web) -> None:
    _, session = await _person(web)
    secret, _ = await _key(web, session, "script")
    r = await web.client.get("/api/v1/account/export",
                             headers={"Authorization": f"Bearer {secret}"})
    assert r.status == 403
    assert b"schema_version" not in await r.read()
    r = await web.client.get("/api/v1/account/export")
    assert r.status == 401


async def _peak_while_exporting(pool: asyncpg.Pool, account: uuid.UUID
                                ) -> tuple[int, int, int]:
    """(peak traced bytes, document bytes, usage rows seen) of one export to a sink
    that keeps nothing but a count, as a client saving to disk would."""
    written = lines = 0

    async def sink(data: bytes) -> None:
        nonlocal written, lines
        written += len(data)
        lines += data.count(b'"endpoint":')  # one per usage row; rows never split a chunk

    async with pool.acquire() as conn:
        tracemalloc.start()
        try:
            counts = await export.write_export(conn, account, datetime.now(UTC), sink)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert counts["usage_logs"] == lines
    return peak, written, lines


async def test_memory_stays_flat_while_the_rows_grow_twentyfold(
    pool: asyncpg.Pool, account_id: str
) -> None:
    account = uuid.UUID(account_id)
    now = datetime.now(UTC)
    await usage_rows(pool, account, "k1", 1_500, now)
    await _peak_while_exporting(pool, account)  # warm: statement caches, codecs
    small_peak, small_bytes, small_rows = await _peak_while_exporting(pool, account)
    await usage_rows(pool, account, "k1", 28_500, now - timedelta(seconds=2))
    big_peak, big_bytes, big_rows = await _peak_while_exporting(pool, account)
    assert (small_rows, big_rows) == (1_500, 30_000)
    assert big_bytes > 15 * small_bytes
    # Twenty times the rows, the same memory: the cursor's prefetch and one buffer.
    print(f"export peak: {small_rows} rows {small_peak} B ({small_bytes} B doc); "
          f"{big_rows} rows {big_peak} B ({big_bytes} B doc)")
    assert big_peak < small_peak * 1.5 + 256 * 1024
    assert big_peak < big_bytes / 10


def _documented() -> dict[str, list[str]]:
    """Each heading of EXPORT_SCHEMA.md with the fields of its table, in order."""
    text = (Path(export.__file__).parent / "EXPORT_SCHEMA.md").read_text("utf-8")
    found: dict[str, list[str]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("| `"):
            found.setdefault(heading, []).append(line.split("`")[1])
    return found


async def test_the_documented_schema_is_the_one_written(
    pool: asyncpg.Pool, account_id: str
) -> None:
    account = uuid.UUID(account_id)
    now = datetime.now(UTC)
    await usage_rows(pool, account, "k1", 1, now)
    await billing_rows(pool, account, now, f"pi_{account}")
    await pool.execute("INSERT INTO users (id, email, email_verified) VALUES ($1, $2, true)",
                       uuid.UUID(int=account.int ^ 1), f"{account}@example.test")
    user = uuid.UUID(int=account.int ^ 1)
    await pool.execute("INSERT INTO memberships VALUES ($1, $2, 'owner')", account, user)
    await pool.execute("INSERT INTO identities (provider, subject, user_id) "
                       "VALUES ('dev', $1, $2)", str(user), user)
    await pool.execute("INSERT INTO acceptances (user_id, what, policy_version) "
                       "VALUES ($1, 'terms', '1')", user)
    await pool.execute("INSERT INTO web_sessions (id, user_id, account_id, expires_at) "
                       "VALUES ($1, $2, $3, now())", uuid.uuid4(), user, account)
    await pool.execute("INSERT INTO api_keys (key_id, account_id, name, secret_hash) "
                       "VALUES ($1, $2, 'k', 'x')", f"k{account.hex[:12]}", account)
    await requests.record(pool, account, "access", "gdpr", now, "staff")
    await payment_rows(pool, account, user, now)
    await account_rows(pool, account, user, now)
    chunks: list[bytes] = []

    async def sink(data: bytes) -> None:
        chunks.append(data)

    async with pool.acquire() as conn:
        counts = await export.write_export(conn, account, now, sink)
    doc = orjson.loads(b"".join(chunks))
    assert all(counts[s] >= 1 for s in SECTIONS[1:]), counts
    assert b"body-not-exported" not in b"".join(chunks)  # e-mails without their bodies
    documented = _documented()
    assert documented.pop("Top level") == [k for k in doc if k not in SECTIONS]
    assert documented.pop("account") == list(doc["account"])
    assert list(documented) == SECTIONS[1:]
    for section, fields in documented.items():
        assert fields == list(doc[section][0]), section
