"""Balance triggers (issue 13): the one mechanism behind auto top-up and the
low-balance e-mail. A trigger fires once per crossing of its threshold, on one replica.

Where the balance is watched: after ingest commits a batch, the consumer hands the
accounts it debited to ``BalanceWatch.note`` (an in-memory set: nothing is added to
the batch's transaction, and nothing at all to the proxy's per-request path). The
watch task then reads those accounts' enabled triggers (one indexed query, only
accounts that set one up cost anything) and their settled balance from Redis: the live
balance plus what in-flight requests hold, the balance the dashboard shows. It is at
least as fresh as the ledger, since the proxy settles before ingest writes the debit,
and reading it is two Redis reads, where the ledger's sum would read every debit.

Once per crossing: a trigger is armed or disarmed in Postgres. Firing is ONE
conditional UPDATE (``... WHERE armed``) that disarms it and counts the crossing, and
the trigger's action (``Action``: queue the e-mail, or write the charge to make) runs
in that same transaction; two replicas seeing the same crossing race for that UPDATE
and exactly one updates a row. The trigger is re-armed when a check sees the balance
at or above the threshold again: after each batch for the accounts in it, and every
``sweep_s`` for every disarmed trigger (an idle account's top-up re-arms it too). Only
accounts whose status is ``active`` fire. Must not import ``control_plane.web`` or
``proxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from control_plane.outages import POSTGRES_ERRORS
from control_plane.publisher import live_balance
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

AUTO_TOPUP, LOW_BALANCE = "auto_topup", "low_balance"
KINDS = (AUTO_TOPUP, LOW_BALANCE)
# Postgres or Redis unavailable: the watch and the charger try again at their next tick.
STORE_ERRORS: tuple[type[BaseException], ...] = (*POSTGRES_ERRORS, RedisError)

Clock = Callable[[], datetime]
# Runs in the claiming transaction: (conn, account, crossing number, balance, now).
Action = Callable[[asyncpg.Connection, uuid.UUID, int, int, datetime], Awaitable[None]]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Decision(enum.Enum):
    FIRE = "fire"
    REARM = "rearm"
    NOTHING = "nothing"


def decide(armed: bool, balance_micros: int, threshold_micros: int) -> Decision:
    """Below the threshold and armed: fire. At or above it and disarmed: re-arm."""
    if balance_micros < threshold_micros:
        return Decision.FIRE if armed else Decision.NOTHING
    return Decision.NOTHING if armed else Decision.REARM


@dataclass(frozen=True, slots=True)
class Trigger:
    account_id: uuid.UUID
    kind: str
    threshold_micros: int
    armed: bool


_CLAIM = """
UPDATE balance_triggers t SET armed = false, crossings = t.crossings + 1, fired_at = $3
FROM accounts a
WHERE t.account_id = $1 AND t.kind = $2 AND t.enabled AND t.armed
  AND a.id = t.account_id AND a.status = 'active'
RETURNING t.crossings
"""

# An auto top-up whose charge is still being made is not re-armed: a second crossing
# must not start a second charge while the first is in flight.
_REARM = """
UPDATE balance_triggers t SET armed = true
WHERE t.account_id = $1 AND t.kind = $2 AND t.enabled AND NOT t.armed
  AND (t.kind <> 'auto_topup' OR NOT EXISTS (
       SELECT 1 FROM auto_topup_charges c
       WHERE c.account_id = t.account_id AND c.status = 'pending'))
"""


async def triggers_of(conn: asyncpg.Pool | asyncpg.Connection,
                      accounts: Iterable[uuid.UUID]) -> list[Trigger]:
    rows = await conn.fetch(
        "SELECT account_id, kind, threshold_micros, armed FROM balance_triggers "
        "WHERE account_id = ANY($1::uuid[]) AND enabled", list(accounts))
    return [Trigger(r["account_id"], r["kind"], r["threshold_micros"], r["armed"])
            for r in rows]


async def settled_balance(redis: aioredis.Redis, names: RedisNames, account: uuid.UUID
                          ) -> int | None:
    """Live balance + reservations; None while Redis has no state for the account."""
    live, reserved = await live_balance(redis, names, account)
    return None if live is None else live + reserved


async def fire(pool: asyncpg.Pool, trigger: Trigger, balance_micros: int, action: Action,
               now: datetime) -> int | None:
    """Claim this crossing and run its action in one transaction; the crossing number,
    or None when another replica (or an earlier check) claimed it first."""
    async with pool.acquire() as conn, conn.transaction():
        crossing: int | None = await conn.fetchval(
            _CLAIM, trigger.account_id, trigger.kind, now)
        if crossing is None:
            return None
        await action(conn, trigger.account_id, crossing, balance_micros, now)
    log.info("balance trigger fired kind=%s account_id=%s crossing=%d", trigger.kind,
             trigger.account_id, crossing)
    return crossing


async def rearm(pool: asyncpg.Pool, trigger: Trigger) -> bool:
    status: str = await pool.execute(_REARM, trigger.account_id, trigger.kind)
    return status.endswith(" 1")


@dataclass(slots=True)
class Checked:
    fired: int = 0
    rearmed: int = 0


async def check(pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames,
                actions: Mapping[str, Action], accounts: Iterable[uuid.UUID],
                clock: Clock = utc_now) -> Checked:
    """Compare the accounts' balances with their enabled triggers; fire or re-arm."""
    done = Checked()
    wanted = set(accounts)
    if not wanted:
        return done
    balances: dict[uuid.UUID, int | None] = {}
    for trigger in await triggers_of(pool, wanted):
        if trigger.account_id not in balances:
            balances[trigger.account_id] = await settled_balance(redis, names,
                                                                 trigger.account_id)
        balance = balances[trigger.account_id]
        if balance is None:
            continue  # unpublished: the reconciler rebuilds it, a later check sees it
        decision = decide(trigger.armed, balance, trigger.threshold_micros)
        action = actions.get(trigger.kind)
        if decision is Decision.FIRE and action is not None:
            # (No action: auto top-up on a replica without Stripe; one with it fires.)
            if await fire(pool, trigger, balance, action, clock()) is not None:
                done.fired += 1
        elif decision is Decision.REARM and await rearm(pool, trigger):
            done.rearmed += 1
    return done


async def disarmed_accounts(pool: asyncpg.Pool) -> list[uuid.UUID]:
    rows = await pool.fetch(
        "SELECT DISTINCT account_id FROM balance_triggers WHERE enabled AND NOT armed")
    return [r["account_id"] for r in rows]


class BalanceWatch:
    """The watch task of one ingest replica: checks the accounts ingest debited, and
    every ``sweep_s`` the disarmed triggers. ``on_fired`` is told when a check fired
    something (the charger, to make the charge now rather than at its next tick)."""

    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames,
                 actions: Mapping[str, Action], *, sweep_s: float = 5.0,
                 clock: Clock = utc_now, on_fired: Callable[[], None] | None = None) -> None:
        self._pool, self._redis, self._names = pool, redis, names
        self._actions, self._sweep_s, self._clock = actions, sweep_s, clock
        self._on_fired = on_fired
        self._dirty: set[uuid.UUID] = set()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    def note(self, accounts: Iterable[uuid.UUID]) -> None:
        """Ingest debited these accounts (called after its commit; never blocks)."""
        self._dirty.update(accounts)
        if self._dirty:
            self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       max(0.0, next_sweep - loop.time()))
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stop.is_set():
                break
            accounts, self._dirty = self._dirty, set()
            try:
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self._sweep_s
                    accounts.update(await disarmed_accounts(self._pool))
                done = await check(self._pool, self._redis, self._names, self._actions,
                                   accounts, self._clock)
            except STORE_ERRORS as e:
                # Checked again once the store answers: nothing is lost, and a store
                # that is down is not asked more than once per back-off.
                log.warning("balance watch check failed (%s)", type(e).__name__)
                self._dirty |= accounts
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(self._sweep_s, 1.0))
                continue
            except Exception:  # top of the task: a bug must not end the watch
                log.exception("balance watch check failed unexpectedly")
                continue
            if done.fired and self._on_fired is not None:
                self._on_fired()
