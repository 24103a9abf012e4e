"""The purge of deleted accounts and the 7-year end of billing records, both run by
the maintenance job (``service.maintain_once``) on its injected clock.

``Purger.run`` purges every account whose ``purge_after`` has passed (the grace period
of a self-service deletion, at once for a child's account, see ``deletion``): first the
Stripe customer is deleted through the API, then, in one transaction, every table in
``registry.TABLES`` gets its statement (personal rows deleted, billing rows and the
record of compliance given one new random account id, drawn here and written nowhere
else), the open deletion request is answered, and the account's Redis state, key
records and counters are removed. A replica that finds the account locked by another
skips it; an account is postponed to a later pass (logged by id) while ingest has not
stored every event from before its deletion settled, while Stripe is down, or if a
table nobody classified blocks it. The real and the anonymous id are never logged
together.

``expire_billing`` deletes billing records older than ``BILLING_YEARS`` (policy clause
6). An account still open keeps its balance: what its deleted ledger rows summed to is
carried forward as one adjustment row. Never imports ``proxy`` or the web app.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from control_plane.billing.gateway import StripeRefused, StripeUnavailable
from control_plane.privacy import requests
from control_plane.privacy.deadlines import add_months
from control_plane.privacy.deletion import SETTLE
from control_plane.privacy.registry import TABLES, Fate
from control_plane.trim import parse_id
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

BILLING_YEARS = 7
BATCH = 1000
ACCOUNTS_PER_PASS = 100


class CustomerDeleter(Protocol):
    async def delete_customer(self, customer_id: str) -> bool: ...


class PurgeBlocked(Exception):
    """An account that cannot be purged on this pass (the reason names no person)."""


@dataclass(frozen=True, slots=True)
class Purger:
    redis: aioredis.Redis
    names: RedisNames
    stripe: CustomerDeleter | None  # None: Stripe not configured on this server
    # The event streams ingest reads (``names.event_streams(shards)``), trimmed by the
    # same maintenance pass just before the purge runs.
    streams: tuple[str, ...] = ()

    async def run(self, pool: asyncpg.Pool, now: datetime) -> int:
        """Purge the accounts due at ``now``; how many were purged by this replica."""
        due = await pool.fetch(
            "SELECT id, deletion_requested_at FROM accounts WHERE purge_after <= $1 "
            "ORDER BY purge_after LIMIT $2", now, ACCOUNTS_PER_PASS)
        purged = 0
        for row in due:
            try:
                await self._ingested_past(row["deletion_requested_at"] + SETTLE)
                purged += await self.purge(pool, row["id"], now)
            except (PurgeBlocked, StripeUnavailable, StripeRefused, RedisError,
                    asyncpg.PostgresError) as e:
                log.warning("account purge postponed account_id=%s reason=%s", row["id"],
                            e if isinstance(e, PurgeBlocked) else type(e).__name__)
        return purged

    async def purge(self, pool: asyncpg.Pool, account_id: uuid.UUID, now: datetime) -> bool:
        """Purge one due account; False if it is not due or another replica has it."""
        customers = [r["stripe_customer_id"] for r in await pool.fetch(
            "SELECT stripe_customer_id FROM billing_customers WHERE account_id = $1",
            account_id)]
        if customers and self.stripe is None:
            raise PurgeBlocked("its Stripe customer cannot be deleted: Stripe is not "
                               "configured here")
        for customer in customers:  # deleting twice is harmless: Stripe says missing
            assert self.stripe is not None
            await self.stripe.delete_customer(customer)
        async with pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(
                    "SELECT id FROM accounts WHERE id = $1 AND purge_after <= $2 "
                    "FOR UPDATE SKIP LOCKED", account_id, now) is None:
                return False
            key_ids = [r["key_id"] for r in await conn.fetch(
                "SELECT key_id FROM api_keys WHERE account_id = $1", account_id)]
            user_ids = [r["user_id"] for r in await conn.fetch(
                "SELECT user_id FROM memberships WHERE account_id = $1", account_id)]
            asked = await requests.open_of_type(conn, account_id, "deletion")
            if asked is not None:
                await requests.complete(conn, asked, now, "fulfilled")
            anonymous = uuid.uuid4()
            for table in TABLES:
                sql = table.statement()
                if sql is None:
                    continue
                if table.fate is Fate.ANONYMISED:
                    await conn.execute(sql, account_id, anonymous)
                elif table.of_users:
                    await conn.execute(sql, user_ids)
                else:
                    await conn.execute(sql, account_id)
            # Inside the transaction: Redis failing rolls the purge back, to be retried.
            await self._forget(account_id, key_ids)
        log.info("account purged account_id=%s keys=%d users=%d", account_id, len(key_ids),
                 len(user_ids))
        return True

    async def _ingested_past(self, moment: datetime) -> None:
        """Every event added before ``moment`` (the deletion plus the time requests in
        flight take to settle) is stored, so no usage or debit of the account can
        arrive after its purge: the head of each trimmed stream, the oldest entry some
        consumer still needs, is younger (entry ids are Redis's milliseconds)."""
        cutoff_ms = int(moment.timestamp() * 1000)
        for stream in self.streams:
            head = await self.redis.xrange(stream, count=1)
            if head and parse_id(head[0][0])[0] <= cutoff_ms:
                raise PurgeBlocked("ingest has not yet stored every event from before "
                                   "the deletion settled")

    async def _forget(self, account_id: uuid.UUID, key_ids: list[str]) -> None:
        """The account's admission state, counters and key records, gone from Redis;
        every proxy told to drop the keys from its cache."""
        names = self.names
        doomed = [names.key_record(k) for k in key_ids]
        async for name in self.redis.scan_iter(match=f"{names.account_tag(str(account_id))}:*",
                                               count=500):
            doomed.append(name)
        async with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(doomed), 500):
                pipe.unlink(*doomed[start:start + 500])
            for key_id in key_ids:
                pipe.publish(names.key_changes, key_id)
            await pipe.execute()


async def expire_billing(pool: asyncpg.Pool, now: datetime) -> int:
    """Delete billing records older than ``BILLING_YEARS`` years; how many ledger rows.

    The ledger is read from its oldest id up (ids grow with time), a batch at a time,
    so a pass costs what it deletes, never a scan of seven years of rows."""
    cutoff = add_months(now, -12 * BILLING_YEARS)
    deleted = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT l.id, l.account_id, l.amount_micros, l.created_at, "
                "(a.id IS NOT NULL) AS open FROM credit_ledger l "
                "LEFT JOIN accounts a ON a.id = l.account_id ORDER BY l.id LIMIT $1 "
                "FOR UPDATE OF l", BATCH)
            old = [r for r in rows if r["created_at"] < cutoff]
            if old:
                await _delete_ledger_rows(conn, old, cutoff)
            deleted += len(old)
        if len(old) < BATCH:
            break
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM billing_events WHERE received_at < $1", cutoff)
        # A payment's records go with it: its charge's refunds and disputes, the charge,
        # the top-up (children first: they point at it). Off-session charges by their own
        # date; one still pending is never seven years old, but is never cut off either.
        for child in ("billing_refunds", "billing_disputes"):
            await conn.execute(
                f"DELETE FROM {child} x USING billing_charges c, billing_topups t "  # noqa: S608
                "WHERE x.charge_id = c.charge_id AND c.payment_intent_id = "
                "t.payment_intent_id AND t.created_at < $1", cutoff)
        await conn.execute(
            "DELETE FROM billing_charges c USING billing_topups t WHERE "
            "c.payment_intent_id = t.payment_intent_id AND t.created_at < $1", cutoff)
        await conn.execute("DELETE FROM billing_topups WHERE created_at < $1", cutoff)
        await conn.execute("DELETE FROM auto_topup_charges WHERE created_at < $1 "
                           "AND status <> 'pending'", cutoff)
        # A deleted account's Stripe customer id, once nothing of it is left to reconcile.
        await conn.execute(
            "DELETE FROM billing_customers c WHERE created_at < $1 "
            "AND NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = c.account_id) "
            "AND NOT EXISTS (SELECT 1 FROM billing_topups t WHERE t.account_id = c.account_id)",
            cutoff)
    if deleted:
        log.info("billing retention deleted ledger_rows=%d", deleted)
    return deleted


async def _delete_ledger_rows(conn: asyncpg.Connection, old: list[asyncpg.Record],
                              cutoff: datetime) -> None:
    ids = [r["id"] for r in old]
    carried: dict[uuid.UUID, int] = defaultdict(int)
    for r in old:
        if r["open"]:
            carried[r["account_id"]] += r["amount_micros"]
    await conn.execute("DELETE FROM billing_events WHERE ledger_id = ANY($1::bigint[])", ids)
    await conn.execute("DELETE FROM credit_pending WHERE ledger_id = ANY($1::bigint[])", ids)
    await conn.execute("DELETE FROM credit_ledger WHERE id = ANY($1::bigint[])", ids)
    reference = f"retention:{cutoff:%Y-%m-%d}:{max(ids)}"
    await conn.executemany(
        "INSERT INTO credit_ledger (account_id, kind, amount_micros, reference) "
        "VALUES ($1, 'adjustment', $2, $3)",
        [(account, amount, reference) for account, amount in carried.items() if amount])
