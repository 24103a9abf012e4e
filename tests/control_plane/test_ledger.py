"""The credit ledger and the live balance: what a paying customer would notice."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from control_plane import accounts, ledger
from control_plane.errors import Conflict, InvalidInput, NotFound
from control_plane.publisher import load_state, publish_state
from control_plane.settings import Settings
from shared.redis_names import RedisNames
from tests.support import free_port


async def _account(pool: asyncpg.Pool, rclient: aioredis.Redis, names: RedisNames) -> str:
    return str((await accounts.create_account(pool, rclient, names, "acme")).id)


async def _bal(rclient: aioredis.Redis, names: RedisNames, account_id: str) -> int:
    return int(await rclient.hget(names.account_state(account_id), "bal"))


async def test_new_account_is_published_active_with_nothing_to_spend(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    names = settings.names
    account_id = await _account(pool, rclient, names)
    state = await rclient.hgetall(names.account_state(account_id))
    assert state[b"bal"] == b"0" and state[b"status"] == b"active"
    assert (state[b"rpm"], state[b"tpm"], state[b"conc"]) == (b"0", b"0", b"0")


async def test_a_repeated_reference_credits_once(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    names = settings.names
    account_id = await _account(pool, rclient, names)
    ref = f"pay-{uuid.uuid4()}"

    first = await ledger.credit(pool, rclient, names, account_id, "topup", 5_000_000, ref)
    again = await ledger.credit(pool, rclient, names, account_id, "topup", 5_000_000, ref)

    assert first.created and not again.created
    assert again.entry == first.entry
    assert again.balance == ledger.Balance(5_000_000, 5_000_000, 0)
    with pytest.raises(Conflict):
        await ledger.credit(pool, rclient, names, account_id, "topup", 7_000_000, ref)
    other = await _account(pool, rclient, names)
    with pytest.raises(Conflict):
        await ledger.credit(pool, rclient, names, other, "topup", 5_000_000, ref)
    # The same reference under another kind is another credit.
    refund = await ledger.credit(pool, rclient, names, account_id, "refund", 1, ref)
    assert refund.created and refund.balance.live_micros == 5_000_001


async def test_live_balance_matches_the_ledger_around_reservations(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    names = settings.names
    account_id = await _account(pool, rclient, names)
    state, resv = names.account_state(account_id), names.account_reservations(account_id)
    for amount in (1_000_000, 2_500_000):
        await ledger.credit(pool, rclient, names, account_id, "topup", amount)
    await ledger.credit(pool, rclient, names, account_id, "adjustment", -500_000)
    # Two requests in flight, reserved as the proxy's admission script does.
    for request, held in (("r1", 300_000), ("r2", 200_000)):
        await rclient.hset(resv, request, held)
        await rclient.hincrby(state, "bal", -held)

    got = await ledger.get_balance(pool, rclient, names, account_id)
    assert got == ledger.Balance(3_000_000, 2_500_000, 500_000)

    # Redis loses the hash: the rebuild holds the in-flight reservations back.
    await rclient.delete(state)
    assert await ledger.get_balance(pool, rclient, names, account_id) == ledger.Balance(
        3_000_000, None, 500_000
    )
    loaded = await load_state(pool, uuid.UUID(account_id))
    assert loaded is not None
    assert await publish_state(rclient, names, loaded)
    assert await _bal(rclient, names, account_id) == 2_500_000
    assert not await publish_state(rclient, names, loaded)  # an existing balance stays

    # r1 settles at 120_000 (proxy refunds the rest), ingest writes its debit; r2 is
    # refunded in full. Then Redis and the ledger agree to the micro-dollar.
    await rclient.hdel(resv, "r1", "r2")
    await rclient.hincrby(state, "bal", 300_000 - 120_000 + 200_000)
    await pool.execute(
        "INSERT INTO credit_ledger (account_id, kind, amount_micros, event_id) "
        "VALUES ($1, 'debit', -120000, $2)", uuid.UUID(account_id), uuid.uuid4(),
    )
    got = await ledger.get_balance(pool, rclient, names, account_id)
    assert got == ledger.Balance(2_880_000, 2_880_000, 0)


async def test_a_credit_left_pending_by_a_crash_is_applied_exactly_once(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    names = settings.names
    account_id = await _account(pool, rclient, names)
    await ledger.credit(pool, rclient, names, account_id, "topup", 1_000_000)

    async def crashed_credit(amount: int) -> int:
        """The ledger and pending rows committed; the process died before Redis."""
        async with pool.acquire() as conn, conn.transaction():
            ledger_id: int = await conn.fetchval(
                "INSERT INTO credit_ledger (account_id, kind, amount_micros) "
                "VALUES ($1, 'topup', $2) RETURNING id", uuid.UUID(account_id), amount,
            )
            await conn.execute("INSERT INTO credit_pending VALUES ($1, $2)",
                               ledger_id, uuid.UUID(account_id))
        return ledger_id

    lost = await crashed_credit(2_000_000)
    assert await _bal(rclient, names, account_id) == 1_000_000  # under-credited, never over
    assert await ledger.drain_pending(pool, rclient, names) == 1
    assert await _bal(rclient, names, account_id) == 3_000_000
    # Died after Redis took it but before the pending row was deleted: no double credit.
    await pool.execute("INSERT INTO credit_pending VALUES ($1, $2)", lost,
                       uuid.UUID(account_id))
    await ledger.drain_pending(pool, rclient, names)
    assert await _bal(rclient, names, account_id) == 3_000_000
    # Redis also lost the state meanwhile: the rebuild counts the credit once.
    await crashed_credit(4_000_000)
    await rclient.delete(names.account_state(account_id))
    await ledger.drain_pending(pool, rclient, names)
    assert await _bal(rclient, names, account_id) == 7_000_000
    # The next credit through the API finds nothing left over.
    done = await ledger.credit(pool, rclient, names, account_id, "topup", 1)
    assert done.balance == ledger.Balance(7_000_001, 7_000_001, 0)
    assert await pool.fetchval("SELECT count(*) FROM credit_pending WHERE account_id = $1",
                               uuid.UUID(account_id)) == 0


async def test_redis_down_after_commit_still_credits(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    names = settings.names
    account_id = await _account(pool, rclient, names)
    down = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1,
                          retry=Retry(NoBackoff(), 0))
    try:
        done = await ledger.credit(pool, down, names, account_id, "topup", 9_000_000)
    finally:
        await down.aclose()
    assert done.created and done.balance == ledger.Balance(9_000_000, None, None)
    assert await _bal(rclient, names, account_id) == 0
    await ledger.drain_pending(pool, rclient, names)  # what the reconciler does each tick
    assert await _bal(rclient, names, account_id) == 9_000_000


@pytest.mark.parametrize(
    ("kind", "amount", "reference"),
    [("gift", 1, None), ("topup", 0, None), ("topup", -1, None), ("refund", 1.5, None),
     ("topup", True, None), ("adjustment", 0, None), ("topup", "5", None),
     ("topup", 10**13, None), ("adjustment", -(10**13), None), ("topup", 1, ""),
     ("topup", 1, 7), ("topup", 1, "x" * 201), ("topup", 1, "a\nb")],
)
async def test_bad_credits_are_refused(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, account_id: str,
    kind: object, amount: object, reference: object,
) -> None:
    with pytest.raises(InvalidInput):
        await ledger.credit(pool, rclient, settings.names, account_id, kind, amount, reference)


async def test_unknown_accounts_get_no_credit(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis
) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound):
        await ledger.credit(pool, rclient, settings.names, missing, "topup", 1)
    with pytest.raises(NotFound):
        await ledger.get_balance(pool, rclient, settings.names, "nope")
    assert await pool.fetchval("SELECT count(*) FROM credit_ledger WHERE account_id = $1",
                               uuid.UUID(missing)) == 0
