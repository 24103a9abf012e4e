"""Credits to the prepaid ledger (top-ups, refunds, adjustments) and balance reads.

Debits are written by ingest, from the proxy's settled events; this module writes the
other kinds and hands each credit to the live balance in Redis.

How a credit reaches Redis, and what a crash can do:

1. In one Postgres transaction: the ledger row, plus a ``credit_pending`` row naming it.
   A repeated ``reference`` (per kind) finds the original row and inserts nothing.
2. After the commit, every pending credit of the account is added to ``bal`` in Redis
   by a script that also records the ledger id in the state's ``credited`` field and
   skips any id at or below it; then the pending rows are deleted.

Steps 1–2 hold a per-account advisory lock, so an account's credits get ledger ids
in commit order and reach Redis in that order, which is what makes one "highest
applied id" enough to recognise a credit Redis already has.

Guarantee: a committed credit reaches the live balance exactly once. It is never
applied twice (Redis's ``credited`` id makes a re-apply a no-op, and a rebuild from
the ledger sets it to the highest credit it summed). If the process dies or Redis is
unreachable between the commit and step 2, the credit is durable but not yet
spendable — the safe direction: the customer is briefly under-credited, never
credited money the ledger lacks — until the reconciler applies the pending row (every
tick, ~0.5 s) or the caller retries with the same reference. The credit call itself
succeeds in that case, reporting ``live_micros: null``. Never imports ``proxy``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from control_plane.accounts import get_account, parse_account_id
from control_plane.errors import Conflict, InvalidInput
from control_plane.publisher import apply_credit, live_balance, load_state, publish_state
from shared.pricing import MICROS_PER_DOLLAR
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

CREDIT_KINDS = ("topup", "refund", "adjustment")
MAX_AMOUNT_MICROS = 1_000_000 * MICROS_PER_DOLLAR  # one entry moves at most $1M
MAX_REFERENCE_LEN = 200
_LOCK_CLASS = 0x514E5001  # advisory-lock namespace: one lock per account's credits
_COLUMNS = "id, account_id, kind, amount_micros, reference, created_at"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    account_id: uuid.UUID
    kind: str
    amount_micros: int
    reference: str | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "account_id": str(self.account_id), "kind": self.kind,
            "amount_micros": self.amount_micros, "reference": self.reference,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Balance:
    """``live_micros`` is None while Redis has no state for the account (or is down)."""

    ledger_micros: int
    live_micros: int | None
    reserved_micros: int | None

    def to_json(self) -> dict[str, Any]:
        return {"ledger_micros": self.ledger_micros, "live_micros": self.live_micros,
                "reserved_micros": self.reserved_micros}


@dataclass(frozen=True, slots=True)
class Credited:
    entry: LedgerEntry
    created: bool  # False: the reference was already in the ledger; nothing changed
    balance: Balance

    def to_json(self) -> dict[str, Any]:
        return {"entry": self.entry.to_json(), "created": self.created,
                "balance": self.balance.to_json()}


def clean_credit(kind: object, amount: object, reference: object) -> tuple[str, int, str | None]:
    if kind not in CREDIT_KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(CREDIT_KINDS)}")
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidInput("amount_micros must be an integer (micro-dollars)")
    if kind != "adjustment" and amount <= 0:
        raise InvalidInput(f"a {kind} must be positive")
    if amount == 0:
        raise InvalidInput("an adjustment must not be zero")
    if abs(amount) > MAX_AMOUNT_MICROS:
        raise InvalidInput(f"amount_micros must be at most {MAX_AMOUNT_MICROS} in size")
    if reference is not None and (
        not isinstance(reference, str) or not reference.strip()
        or len(reference) > MAX_REFERENCE_LEN or not reference.isprintable()
    ):
        raise InvalidInput(
            f"reference must be a printable string of 1 to {MAX_REFERENCE_LEN} characters"
        )
    return str(kind), amount, reference


async def credit(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, account_id: str,
    kind: object, amount_micros: object, reference: object = None,
    *, within: Callable[[asyncpg.Connection, int], Awaitable[None]] | None = None,
) -> Credited:
    """Add a top-up, refund or adjustment to the ledger and to the live balance.

    ``within(conn, ledger_id)`` runs inside the credit's transaction, whether the row
    is new or was already there: a caller records what caused the credit (a Stripe
    event id) atomically with it."""
    kind_, amount, ref = clean_credit(kind, amount_micros, reference)
    account = parse_account_id(account_id)
    async with account_lock(pool, account) as conn:
        async with conn.transaction():
            await get_account(conn, account_id)
            entry, created = await insert_credit(conn, account, kind_, amount, ref)
            if within is not None:
                await within(conn, entry.id)
        await drain_account(conn, redis, names, account)
    if created:
        log.info("credit kind=%s amount_micros=%d account_id=%s ledger_id=%d",
                 kind_, amount, account, entry.id)
    return Credited(entry, created, await get_balance(pool, redis, names, account_id,
                                                      tolerate_redis_down=True))


@asynccontextmanager
async def account_lock(pool: asyncpg.Pool, account: uuid.UUID
                       ) -> AsyncIterator[asyncpg.Connection]:
    """A connection holding the account's credit lock (every replica's credits of the
    account wait for it): credits get ledger ids in commit order, and a caller may read
    what it bases a credit on without a race (``billing.reversals``)."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", _LOCK_CLASS,
                           str(account))
        try:
            yield conn
        finally:
            if not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))",
                                   _LOCK_CLASS, str(account))


async def insert_credit(conn: asyncpg.Connection, account: uuid.UUID, kind: str,
                        amount: int, reference: str | None) -> tuple[LedgerEntry, bool]:
    """The credit's ledger row and its pending hand-off to Redis, in the caller's
    transaction under ``account_lock`` (values already checked). A repeated reference
    (per kind) finds the original row: (entry, False)."""
    row = await conn.fetchrow(
        f"INSERT INTO credit_ledger (account_id, kind, amount_micros, reference) "  # noqa: S608
        f"VALUES ($1, $2, $3, $4) ON CONFLICT (kind, reference) "
        f"WHERE reference IS NOT NULL DO NOTHING RETURNING {_COLUMNS}",
        account, kind, amount, reference,
    )
    created = row is not None
    if row is None:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM credit_ledger "  # noqa: S608
            "WHERE kind = $1 AND reference = $2", kind, reference,
        )
        assert row is not None
        if (row["account_id"], row["amount_micros"]) != (account, amount):
            raise Conflict(f"reference already used by a different {kind}")
    else:
        await conn.execute(
            "INSERT INTO credit_pending (ledger_id, account_id) VALUES ($1, $2)",
            row["id"], account,
        )
    return LedgerEntry(**dict(row)), created


async def drain_account(conn: asyncpg.Connection, redis: aioredis.Redis, names: RedisNames,
                        account: uuid.UUID) -> None:
    """After the commit, under ``account_lock``: hand the account's pending credits to
    Redis; if Redis is down they stay pending for the reconciler."""
    try:
        await _drain(conn, redis, names, account)
    except RedisError as e:
        log.warning("credit committed, not yet live (reconciler will apply it) "
                    "account_id=%s: %s", account, type(e).__name__)


async def _drain(
    conn: asyncpg.Connection, redis: aioredis.Redis, names: RedisNames, account: uuid.UUID
) -> int:
    """Apply the account's pending credits in ledger order; the caller holds its lock."""
    rows = await conn.fetch(
        "SELECT p.ledger_id, l.amount_micros FROM credit_pending p "
        "JOIN credit_ledger l ON l.id = p.ledger_id "
        "WHERE p.account_id = $1 ORDER BY p.ledger_id",
        account,
    )
    done: list[int] = []
    for row in rows:
        if await apply_credit(redis, names, account, row["ledger_id"], row["amount_micros"]) < 0:
            # No state in Redis: build it from the ledger, which holds every credit
            # committed so far, this one included.
            state = await load_state(conn, account)
            if state is not None:
                await publish_state(redis, names, state)
            done = [r["ledger_id"] for r in rows]
            break
        done.append(row["ledger_id"])
    if done:
        await conn.execute("DELETE FROM credit_pending WHERE ledger_id = ANY($1::bigint[])",
                           done)
    return len(done)


async def drain_pending(pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames) -> int:
    """Apply credits left pending by a crash or a Redis outage; returns how many.

    An account whose lock is held is skipped: its credit in progress drains it.
    """
    applied = 0
    async with pool.acquire() as conn:
        accounts = await conn.fetch("SELECT DISTINCT account_id FROM credit_pending")
        for row in accounts:
            account = row["account_id"]
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))",
                                       _LOCK_CLASS, str(account)):
                continue
            try:
                applied += await _drain(conn, redis, names, account)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))",
                                   _LOCK_CLASS, str(account))
    if applied:
        log.info("pending credits applied count=%d", applied)
    return applied


async def get_balance(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames, account_id: str,
    *, tolerate_redis_down: bool = False,
) -> Balance:
    """The ledger sum, the live balance the proxy admits against, and what is reserved.

    Once traffic stops and ingest catches up, live + reserved = ledger.
    """
    account = await get_account(pool, account_id)
    ledger = await pool.fetchval(
        "SELECT coalesce(sum(amount_micros), 0)::bigint FROM credit_ledger "
        "WHERE account_id = $1", account.id,
    )
    try:
        live, reserved = await live_balance(redis, names, account.id)
    except RedisError:
        if not tolerate_redis_down:
            raise
        return Balance(ledger, None, None)
    return Balance(ledger, live, reserved)
