"""The crossing logic of auto top-up and the low-balance e-mail (``balance_watch``),
against real Postgres and Redis with an injected clock: a trigger fires once per
crossing however many checks race for it, is re-armed only above its threshold, never
fires for an account that is not active; and the low-balance e-mail reaches a real
aiosmtpd server exactly once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis

from control_plane import ledger
from control_plane.billing import balance_watch, low_balance
from control_plane.billing.balance_watch import LOW_BALANCE, Decision, check, decide
from control_plane.mail.sender import Sender
from control_plane.settings import Settings
from tests.control_plane.mail.conftest import (  # noqa: F401  (fixtures)
    SmtpServer,
    outbox_pool,
    smtp,
    smtp_down,
)

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 12, 2, 1, 0, tzinfo=UTC)
DOLLAR = 1_000_000
URL = "https://qnp.test"


@pytest.mark.parametrize(("armed", "balance", "threshold", "expected"), [
    (True, 4 * DOLLAR, 5 * DOLLAR, Decision.FIRE),
    (True, 5 * DOLLAR, 5 * DOLLAR, Decision.NOTHING),  # at the threshold is not below
    (True, 6 * DOLLAR, 5 * DOLLAR, Decision.NOTHING),
    (False, 4 * DOLLAR, 5 * DOLLAR, Decision.NOTHING),  # still below: once per crossing
    (False, 5 * DOLLAR, 5 * DOLLAR, Decision.REARM),
    (False, -3 * DOLLAR, 5 * DOLLAR, Decision.NOTHING),  # a negative ledger stays below
])
def test_decide(armed: bool, balance: int, threshold: int, expected: Decision) -> None:
    assert decide(armed, balance, threshold) is expected


async def _adjust(pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings,
                  account: str, micros: int) -> None:
    await ledger.credit(pool, redis, settings.names, account, "adjustment", micros)


async def _trigger(pool: asyncpg.Pool, account: uuid.UUID) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM balance_triggers WHERE account_id = $1 "
                              "AND kind = $2", account, LOW_BALANCE)
    assert row is not None
    return row


async def _set_threshold(pool: asyncpg.Pool, account: uuid.UUID, micros: int) -> None:
    async with pool.acquire() as conn:
        await low_balance.configure(conn, account, micros, T0)


async def test_once_per_crossing_however_many_checks_race_and_rearmed_above(
        pool: asyncpg.Pool, rclient: aioredis.Redis, settings: Settings,
        account_id: str) -> None:
    account = uuid.UUID(account_id)
    names = settings.names
    actions = {LOW_BALANCE: low_balance.action(URL)}
    await _set_threshold(pool, account, 5 * DOLLAR)
    await _adjust(pool, rclient, settings, account_id, 10 * DOLLAR)
    assert (await check(pool, rclient, names, actions, [account], lambda: T0)).fired == 0

    await _adjust(pool, rclient, settings, account_id, -6 * DOLLAR)  # $4: crossed
    # Ten checks at once, as ten replicas seeing the same batch would: one claim wins.
    results = await asyncio.gather(*(check(pool, rclient, names, actions, [account],
                                           lambda: T0) for _ in range(10)))
    assert sum(r.fired for r in results) == 1
    row = await _trigger(pool, account)
    assert (row["armed"], row["crossings"], row["fired_at"]) == (False, 1, T0)
    # Still below: nothing more, whatever the debits that follow.
    await _adjust(pool, rclient, settings, account_id, -1 * DOLLAR)
    assert (await check(pool, rclient, names, actions, [account], lambda: T0)).fired == 0

    await _adjust(pool, rclient, settings, account_id, 2 * DOLLAR)  # $5: at, re-armed
    assert (await check(pool, rclient, names, actions, [account], lambda: T0)).rearmed == 1
    assert (await _trigger(pool, account))["armed"] is True
    later = datetime(2026, 12, 2, 2, 0, tzinfo=UTC)
    await _adjust(pool, rclient, settings, account_id, -DOLLAR // 2)  # crossed again
    assert (await check(pool, rclient, names, actions, [account], lambda: later)).fired == 1
    row = await _trigger(pool, account)
    assert (row["crossings"], row["fired_at"]) == (2, later)


async def test_the_sweep_rearms_an_idle_account_and_an_inactive_one_never_fires(
        pool: asyncpg.Pool, rclient: aioredis.Redis, settings: Settings,
        account_id: str) -> None:
    account = uuid.UUID(account_id)
    actions = {LOW_BALANCE: low_balance.action(URL)}
    await _set_threshold(pool, account, 5 * DOLLAR)
    await _adjust(pool, rclient, settings, account_id, 1 * DOLLAR)
    assert (await check(pool, rclient, settings.names, actions, [account])).fired == 1
    await _adjust(pool, rclient, settings, account_id, 9 * DOLLAR)  # a top-up, no traffic
    assert account in await balance_watch.disarmed_accounts(pool)
    # The watch task's sweep: no batch named the account, its disarmed trigger does.
    watch = balance_watch.BalanceWatch(pool, rclient, settings.names, actions, sweep_s=0.05)
    task = asyncio.create_task(watch.run())
    try:
        async with asyncio.timeout(30):  # hang guard
            while not (await _trigger(pool, account))["armed"]:
                await asyncio.sleep(0.02)
    finally:
        watch.stop()
        await task

    await pool.execute("UPDATE accounts SET status = 'suspended' WHERE id = $1", account)
    await _adjust(pool, rclient, settings, account_id, -9 * DOLLAR)
    assert (await check(pool, rclient, settings.names, actions, [account])).fired == 0
    assert (await _trigger(pool, account))["crossings"] == 1


async def test_the_low_balance_email_arrives_once(
        outbox_pool: asyncpg.Pool, rclient: aioredis.Redis, settings: Settings,  # noqa: F811
        account_id: str, smtp: SmtpServer) -> None:  # noqa: F811
    pool = outbox_pool
    account = uuid.UUID(account_id)
    user, address = uuid.uuid4(), f"low-{uuid.uuid4().hex[:8]}@example.test"
    await pool.execute("INSERT INTO users (id, email, email_verified) VALUES ($1, $2, true)",
                       user, address)
    await pool.execute("INSERT INTO memberships (account_id, user_id, role) "
                       "VALUES ($1, $2, 'owner')", account, user)
    actions = {LOW_BALANCE: low_balance.action(URL)}
    await _set_threshold(pool, account, 5 * DOLLAR)
    await _adjust(pool, rclient, settings, account_id, 4_250_000)
    for _ in range(3):
        await asyncio.gather(*(check(pool, rclient, settings.names, actions, [account])
                               for _ in range(4)))
    sender = Sender(pool, smtp.target, "QNP <no-reply@qnp.test>", poll_s=0.05)
    assert await sender.drain() == 1
    assert await sender.drain() == 0
    [message] = smtp.messages()
    assert message["To"] == address
    assert message["Subject"] == "Your QNP balance is below $5.00"
    body = message.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert b"$4.25" in body and f"{URL}/credits".encode() in body
