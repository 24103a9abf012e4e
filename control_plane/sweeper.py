"""Refunding credit reservations that a dead proxy left behind.

Admission reserves a request's estimated cost (``bal`` down, the request id → cost in
the account's reservations hash) and settlement swaps it for the real cost. A proxy
killed in between (SIGKILL, OOM) never settles, so its reservations would hold credit
for ever and the live balance would stay below the ledger. This module finds
reservations older than a maximum age and gives them back, one account per atomic
script.

A reservation's age comes from its key: request ids are UUIDv7, whose first 48 bits
(the first 12 hex digits) are the Unix time in milliseconds when the proxy made them.
"Now" is Redis's own clock (``TIME``, as the admission scripts use), so control plane
and proxies compare against one clock; only the proxy host's skew when it minted the
id enters, and that is seconds against a maximum age of minutes. Fields that are not
UUIDv7 are never touched.

Why this is safe: the maximum age defaults to the proxy's in-flight lifetime
(``shared.inflight``, 15 minutes; ``QNP_SWEEP_MAX_AGE_S`` sets it), past which a
request no longer counts as in flight anyway. A request still running when its
reservation is swept finds no reservation at settlement, and settle.lua then charges
its full cost directly, so the live balance still ends equal to the ledger; what is
lost is only the hold on that credit while the request runs.
The script refunds only where the state hash exists: without it there is no balance
to correct, and the next rebuild subtracts every reservation still on record (the
sweep then refunds the stale ones). Several control-plane replicas may sweep at once:
each reservation is deleted and refunded in one atomic step, so at most once.

Imports ``shared`` only; never ``proxy``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from shared.inflight import IN_FLIGHT_LIFETIME_MS
from shared.redis_names import RedisNames

# The proxy's in-flight lifetime: past it a request no longer counts as in flight.
DEFAULT_MAX_AGE_MS = IN_FLIGHT_LIFETIME_MS
DEFAULT_BATCH = 500

# KEYS: state, reservations. ARGV: max age ms. Returns {reservations refunded, micros}.
SWEEP_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - tonumber(ARGV[1])
local n, total = 0, 0
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local hex = (string.gsub(all[i], '%-', ''))
  local held = tonumber(all[i + 1])
  -- Only a UUIDv7 (32 hex digits, version digit 7) says when it was made.
  if held and #hex == 32 and not string.find(hex, '%X')
      and string.sub(hex, 13, 13) == '7'
      and tonumber(string.sub(hex, 1, 12), 16) < cutoff then
    redis.call('HDEL', KEYS[2], all[i])
    n = n + 1
    total = total + held
  end
end
if total ~= 0 then redis.call('HINCRBY', KEYS[1], 'bal', total) end
return {n, total}
"""

_PAGE_SQL = "SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT $2"


@dataclass(frozen=True, slots=True)
class SweepResult:
    accounts: int
    reservations: int
    micros: int


class ReservationSweeper:
    """Runs the sweep script over every account, a page of accounts per round trip."""

    def __init__(
        self, redis: aioredis.Redis, names: RedisNames, *,
        max_age_ms: int = DEFAULT_MAX_AGE_MS, batch: int = DEFAULT_BATCH,
    ) -> None:
        if max_age_ms <= 0 or batch <= 0:
            raise ValueError("max_age_ms and batch must be positive")
        self.redis, self.names = redis, names
        self.max_age_ms, self.batch = max_age_ms, batch
        self._script = redis.register_script(SWEEP_LUA)

    async def sweep(self, pool: asyncpg.Pool) -> SweepResult:
        """Refund every reservation older than the maximum age, in every account."""
        accounts = reservations = micros = 0
        after = uuid.UUID(int=0)
        while True:
            # Keyset pages: each query is short and holds no connection during Redis calls.
            ids = [r["id"] for r in await pool.fetch(_PAGE_SQL, after, self.batch)]
            if not ids:
                break
            async with self.redis.pipeline(transaction=False) as pipe:
                for account_id in ids:
                    a = str(account_id)
                    await self._script(
                        keys=[self.names.account_state(a), self.names.account_reservations(a)],
                        args=[self.max_age_ms], client=pipe,
                    )
                replies = await pipe.execute()
            for n, total in replies:
                reservations += int(n)
                micros += int(total)
            accounts += len(ids)
            if len(ids) < self.batch:
                break
            after = ids[-1]
        return SweepResult(accounts, reservations, micros)
