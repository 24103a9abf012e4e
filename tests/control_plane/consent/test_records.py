"""Consent records (issue 15): append-only rows, the current state derived from the
latest row per purpose, a browser's choices attached at sign-in, and a withdrawal that
leaves earlier rows untouched (policy clause 4: "without affecting prior processing")."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from control_plane.consent import records
from control_plane.consent.records import InvalidConsent

T0 = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


async def test_no_row_means_nothing_granted_and_nothing_decided(
    pool: asyncpg.Pool, account_id: str
) -> None:
    state = await records.current(pool, account_id=uuid.UUID(account_id))
    assert state.granted == frozenset() and state.decided == frozenset()
    assert "analytics" not in state


async def test_a_withdrawal_wins_and_leaves_the_grant_before_it_untouched(
    pool: asyncpg.Pool, account_id: str
) -> None:
    account = uuid.UUID(account_id)
    await records.record_many(pool, {"analytics": True, "functional": True},
                              source="banner", policy_version="2026-04", account_id=account,
                              at=T0)
    before = [(r.purpose, r.granted, r.recorded_at)
              for r in await records.history(pool, account)]
    await records.record(pool, purpose="analytics", granted=False, source="settings",
                         policy_version="2026-04", account_id=account,
                         at=T0 + timedelta(hours=1))
    state = await records.current(pool, account_id=account)
    assert state.granted == {"functional"}
    assert state.decided == {"analytics", "functional"}
    after = [(r.purpose, r.granted, r.recorded_at) for r in await records.history(pool, account)]
    assert after[:2] == before and after[2] == ("analytics", False, T0 + timedelta(hours=1))


async def test_rows_cannot_be_rewritten(pool: asyncpg.Pool, account_id: str) -> None:
    account = uuid.UUID(account_id)
    await records.record(pool, purpose="analytics", granted=True, source="banner",
                         policy_version="2026-04", account_id=account)
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pool.execute("UPDATE consent_records SET granted = false")
    assert "analytics" in await records.current(pool, account_id=account)


async def test_a_browsers_choice_is_attached_to_the_account_once_at_sign_in(
    pool: asyncpg.Pool, account_id: str
) -> None:
    account, browser = uuid.UUID(account_id), uuid.uuid4()
    await records.record_many(pool, {"analytics": False, "functional": True},
                              source="banner", policy_version="2026-04", browser_id=browser,
                              at=T0)
    assert (await records.current(pool, browser_id=browser)).granted == {"functional"}
    assert await records.attach(pool, browser, account) == 2
    assert await records.attach(pool, browser, account) == 0  # a second sign-in
    state = await records.current(pool, account_id=account)
    assert state.granted == {"functional"} and state.decided == {"analytics", "functional"}
    # A later choice of the account wins over the older one the browser brought.
    await records.record(pool, purpose="functional", granted=False, source="settings",
                         policy_version="2026-04", account_id=account,
                         at=T0 + timedelta(days=1))
    assert (await records.current(pool, account_id=account)).granted == frozenset()


async def test_another_account_sees_none_of_it(pool: asyncpg.Pool, account_id: str) -> None:
    other = uuid.uuid4()
    await pool.execute("INSERT INTO accounts (id, name) VALUES ($1, 'other')", other)
    await records.record(pool, purpose="marketing_email", granted=True, source="settings",
                         policy_version="2026-04", account_id=uuid.UUID(account_id))
    assert (await records.current(pool, account_id=other)).granted == frozenset()
    assert await records.history(pool, other) == []


@pytest.mark.parametrize("purpose, source", [("advertising", "banner"), ("analytics", "cron")])
async def test_unknown_purposes_and_sources_are_refused(
    pool: asyncpg.Pool, account_id: str, purpose: str, source: str
) -> None:
    with pytest.raises(InvalidConsent):
        await records.record(pool, purpose=purpose, granted=True, source=source,
                             policy_version="2026-04", account_id=uuid.UUID(account_id))
    with pytest.raises(InvalidConsent):
        await records.record(pool, purpose="analytics", granted=True, source="banner",
                             policy_version="2026-04")
