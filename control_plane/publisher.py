"""Publishing each account's admission state (balance, status, limits) to Redis.

The proxy admits against the hash ``names.account_state(id)`` and cannot read Postgres,
so this module is the one writer of that hash apart from the proxy's own
reserve/settle scripts and the sweep of abandoned reservations (``sweeper``). Fields
written here:

- ``bal``: set only when the hash is (re)built, to ledger sum − in-flight reservations;
  afterwards changed only by ``HINCRBY`` (credits here, reserve/settle in the proxy,
  refunds of reservations no proxy will settle in ``sweeper``);
- ``status``, ``rpm``, ``tpm``, ``conc``: overwritten on every publish (0 = unlimited);
- ``credited``: the highest ledger id of a credit (top-up, refund, adjustment) already
  in ``bal``. It makes applying a credit idempotent, and its presence marks a hash the
  control plane built (a hash without it is rebuilt from the ledger).

Both scripts touch only keys under the account's hash tag, so they run on Redis
Cluster. Imports ``shared`` only; never ``proxy``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from shared.redis_names import RedisNames

LIMIT_NAMES = ("rpm", "tpm", "conc")

# KEYS: state, reservations. ARGV: ledger sum, status, rpm, tpm, conc, credited.
# Returns 1 when it (re)built the balance, 0 when the hash existed and only status and
# limits changed: an existing balance already holds every debit the proxy settled that
# ingest has not written yet, which the ledger cannot know.
REBUILD_LUA = """
if redis.call('HEXISTS', KEYS[1], 'credited') == 1 then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'rpm', ARGV[3], 'tpm', ARGV[4],
             'conc', ARGV[5])
  return 0
end
local reserved = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do reserved = reserved + tonumber(v) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'bal', ARGV[1], 'status', ARGV[2], 'rpm', ARGV[3],
           'tpm', ARGV[4], 'conc', ARGV[5], 'credited', ARGV[6])
if reserved ~= 0 then redis.call('HINCRBY', KEYS[1], 'bal', -reserved) end
return 1
"""

# KEYS: state. ARGV: ledger id, amount. Returns 1 applied, 0 already applied, -1 no
# state (the caller rebuilds, which includes the credit).
APPLY_CREDIT_LUA = """
local done = redis.call('HGET', KEYS[1], 'credited')
if not done then return -1 end
if tonumber(ARGV[1]) <= tonumber(done) then return 0 end
redis.call('HINCRBY', KEYS[1], 'bal', ARGV[2])
redis.call('HSET', KEYS[1], 'credited', ARGV[1])
return 1
"""

# One snapshot: the sum and the highest credit id must describe the same ledger rows.
# An account with an open payment dispute (billing.reversals) is published as
# suspended, whatever accounts.status says: every proxy refuses its keys, while its
# user can still sign in, see why and ask for a review.
_STATE_SQL = """
SELECT a.id, CASE WHEN EXISTS (SELECT 1 FROM billing_disputes d WHERE d.account_id = a.id
                               AND d.withdrawn AND d.outcome IS NULL)
             THEN 'suspended' ELSE a.status END AS status,
       a.limits::text AS limits,
       (SELECT coalesce(sum(amount_micros), 0)::bigint FROM credit_ledger l
         WHERE l.account_id = a.id) AS ledger_micros,
       (SELECT coalesce(max(id), 0) FROM credit_ledger l
         WHERE l.account_id = a.id AND l.kind <> 'debit') AS credited
FROM accounts a
"""


@dataclass(frozen=True, slots=True)
class AccountState:
    """What Postgres says an account's Redis state should be built from."""

    account_id: uuid.UUID
    status: str
    limits: dict[str, int]
    ledger_micros: int
    credited: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> AccountState:
        return cls(row["id"], row["status"], decode_limits(row["limits"]),
                   row["ledger_micros"], row["credited"])

    def argv(self) -> list[Any]:
        # The proxy knows active and suspended; an account being deleted is refused
        # like a suspended one.
        status = "suspended" if self.status == "deleting" else self.status
        return [self.ledger_micros, status,
                *(self.limits.get(n, 0) for n in LIMIT_NAMES), self.credited]


def decode_limits(raw: str | None) -> dict[str, int]:
    """Limits as stored (jsonb text), without the zero (unlimited) entries."""
    stored = orjson.loads(raw) if raw else {}
    return {n: int(stored[n]) for n in LIMIT_NAMES if stored.get(n)}


async def load_state(conn: asyncpg.Connection | asyncpg.Pool, account_id: uuid.UUID,
                     ) -> AccountState | None:
    row = await conn.fetchrow(_STATE_SQL + " WHERE a.id = $1", account_id)
    return None if row is None else AccountState.from_row(row)


async def publish_state(redis: aioredis.Redis, names: RedisNames, state: AccountState) -> bool:
    """Write status and limits; build the balance if the hash is missing. True if built."""
    a = str(state.account_id)
    built = await redis.eval(
        REBUILD_LUA, 2, names.account_state(a), names.account_reservations(a), *state.argv()
    )
    return bool(built)


async def apply_credit(
    redis: aioredis.Redis, names: RedisNames, account_id: uuid.UUID, ledger_id: int,
    amount_micros: int,
) -> int:
    """Add one committed credit to the live balance at most once (see APPLY_CREDIT_LUA)."""
    result = await redis.eval(
        APPLY_CREDIT_LUA, 1, names.account_state(str(account_id)), ledger_id, amount_micros
    )
    return int(result)


async def publish_all_states(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, *, chunk: int = 500
) -> tuple[int, int]:
    """Publish every account's state; returns (accounts, balances rebuilt)."""
    count = rebuilt = 0
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        async for row in conn.cursor(_STATE_SQL + " ORDER BY a.id", prefetch=chunk):
            rebuilt += await publish_state(redis, names, AccountState.from_row(row))
            count += 1
    return count, rebuilt


async def live_balance(
    redis: aioredis.Redis, names: RedisNames, account_id: uuid.UUID
) -> tuple[int | None, int]:
    """(live balance or None when unpublished, total reserved by in-flight requests)."""
    a = str(account_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hget(names.account_state(a), "bal")
        pipe.hvals(names.account_reservations(a))
        bal, reserved = await pipe.execute()
    return (None if bal is None else int(bal)), sum(int(v) for v in reserved)
