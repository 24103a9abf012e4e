"""Deleting an account, the part that happens at once (issue 14, policy clauses 6, 11):
``request`` (self-service, after a fresh sign-in and a typed confirmation), ``cancel``
(in the grace period) and ``mark_child`` (staff, clause 11: no grace).

A request, in one Postgres transaction: every key revoked and its record re-published
(the path ``keys.revoke_key`` takes: SET and PUBLISH inside the transaction, so every
proxy drops it at once), every web session revoked, the account ``deleting`` (not
``active``: nothing that acts for active accounts acts for it) with ``purge_after``,
unsent mail cancelled, and an open privacy request of type ``deletion``, answered when
the purge (``purge``) has run. After the commit every replica is told to re-read
sessions and keys ("*" on the session revocation channel, as suspension does).
Cancelling makes the account active again; its keys stay revoked. Logs ids only.
Never imports ``proxy`` or the web app.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import redis.asyncio as aioredis

from control_plane import audit
from control_plane.auth.sessions import ALL
from control_plane.errors import Conflict, Forbidden, InvalidInput, NotFound
from control_plane.keys import publish_keys
from control_plane.mail import outbox
from control_plane.privacy import deadlines, requests
from control_plane.publisher import load_state, publish_state
from shared.inflight import IN_FLIGHT_LIFETIME_MS
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

CONFIRMATION = "delete my account"
FRESH_SIGNIN = timedelta(minutes=5)
# The purge runs on the maintenance loop; a day's margin before the law's due time
# leaves it room to run (and to retry) inside the shortest clock (PIPA's 10 days).
DUE_MARGIN = timedelta(days=1)
# Never sooner than this: a request admitted just before the keys were revoked finishes
# and is billed (ingest writes its usage and debit under the real id) before the purge,
# so nothing of it arrives after the purge, under an id that no longer exists.
SETTLE = timedelta(milliseconds=IN_FLIGHT_LIFETIME_MS) + timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Pending:
    """A deletion waiting for its purge."""

    requested_at: datetime
    purge_after: datetime
    kind: str = "self-service"  # or "child": no grace, cannot be cancelled

    def to_json(self) -> dict[str, str]:
        return {"status": "deleting", "requested_at": self.requested_at.isoformat(),
                "purge_after": self.purge_after.isoformat(), "kind": self.kind}


def check_confirmation(typed: object) -> None:
    if not isinstance(typed, str) or " ".join(typed.lower().split()) != CONFIRMATION:
        raise InvalidInput(f'type "{CONFIRMATION}" to confirm')


async def signed_in_at(conn: asyncpg.Pool | asyncpg.Connection,
                       session_id: uuid.UUID) -> datetime | None:
    """When the person signed in to start this session (``web_sessions.created_at``)."""
    found: datetime | None = await conn.fetchval(
        "SELECT created_at FROM web_sessions WHERE id = $1", session_id)
    return found


async def is_fresh(conn: asyncpg.Pool | asyncpg.Connection, session_id: uuid.UUID,
                   now: datetime) -> bool:
    at = await signed_in_at(conn, session_id)
    return at is not None and now - at <= FRESH_SIGNIN


async def pending(conn: asyncpg.Pool | asyncpg.Connection,
                  account_id: uuid.UUID) -> Pending | None:
    row = await conn.fetchrow(
        "SELECT deletion_requested_at, purge_after, deletion_kind FROM accounts "
        "WHERE id = $1 AND status = 'deleting'", account_id)
    return None if row is None else Pending(row["deletion_requested_at"], row["purge_after"],
                                            row["deletion_kind"])


def purge_time(jurisdiction: str, now: datetime, grace: timedelta) -> datetime:
    """The end of the grace period, never later than a day before the law's due time,
    never sooner than requests in flight settle."""
    return max(min(now + grace, deadlines.due(jurisdiction, now) - DUE_MARGIN), now + SETTLE)


async def _close(conn: asyncpg.Connection, redis: aioredis.Redis, names: RedisNames,
                 account_id: uuid.UUID, now: datetime, purge_after: datetime,
                 kind: str) -> str:
    """Everything a deletion does at once; the caller holds the transaction. Returns
    the account's jurisdiction."""
    row = await conn.fetchrow(
        "UPDATE accounts SET status = 'deleting', deletion_requested_at = $2, "
        "purge_after = $3, deletion_kind = $4 WHERE id = $1 AND status <> 'deleting' "
        "RETURNING jurisdiction", account_id, now, purge_after, kind)
    if row is None:
        raise Conflict("this account is already being deleted")
    await conn.execute(
        "UPDATE api_keys SET status = 'revoked', revoked_at = coalesce(revoked_at, $2) "
        "WHERE account_id = $1", account_id, now)
    revoked = await publish_keys(conn, redis, names, account_id=account_id)
    if revoked:  # a limited key's spend counter has no TTL: it goes with the key
        await redis.delete(*(names.key_spend(str(account_id), k) for k in revoked))
    await conn.execute(
        "UPDATE web_sessions SET revoked_at = coalesce(revoked_at, $2) "
        "WHERE account_id = $1", account_id, now)
    await outbox.cancel_for_account(conn, account_id)
    state = await load_state(conn, account_id)
    assert state is not None
    await publish_state(redis, names, state)  # the proxy reads it as suspended
    jurisdiction: str = row["jurisdiction"]
    return jurisdiction


async def request(pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames,
                  account_id: uuid.UUID, now: datetime, grace: timedelta) -> Pending:
    """The account holder's own request (fresh sign-in and confirmation checked by the
    caller); recorded as an open self-service deletion request."""
    async with pool.acquire() as conn, conn.transaction():
        jurisdiction = await conn.fetchval(
            "SELECT jurisdiction FROM accounts WHERE id = $1 FOR UPDATE", account_id)
        if jurisdiction is None:
            raise NotFound("account not found")
        purge_after = purge_time(jurisdiction, now, grace)
        await _close(conn, redis, names, account_id, now, purge_after, "self-service")
        await requests.record(conn, account_id, "deletion", jurisdiction, now,
                              "self-service")
    await redis.publish(names.session_revocations, ALL)
    log.info("account deletion requested account_id=%s purge_after=%s", account_id,
             purge_after.isoformat())
    return Pending(now, purge_after, "child")


async def cancel(pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames,
                 account_id: uuid.UUID, now: datetime) -> None:
    """Withdraw a deletion in its grace period: the account is active again (its keys
    stay revoked: new ones are issued from the dashboard). A child's account cannot be
    kept."""
    async with pool.acquire() as conn, conn.transaction():
        done = await conn.fetchval(
            "UPDATE accounts SET status = 'active', deletion_requested_at = NULL, "
            "purge_after = NULL, deletion_kind = NULL WHERE id = $1 AND status = 'deleting' "
            "AND deletion_kind = 'self-service' AND purge_after > $2 RETURNING id",
            account_id, now)
        if done is None:
            raise Conflict("there is no deletion to cancel")
        open_request = await requests.open_of_type(conn, account_id, "deletion")
        if open_request is not None:
            await requests.complete(conn, open_request, now, "withdrawn")
        state = await load_state(conn, account_id)
        assert state is not None
        await publish_state(redis, names, state)
    await redis.publish(names.session_revocations, ALL)
    log.info("account deletion cancelled account_id=%s", account_id)


async def mark_child(pool: asyncpg.Pool, redis: aioredis.Redis, names: RedisNames,
                     account_id: uuid.UUID, actor: str, now: datetime) -> Pending:
    """Clause 11: the account is a child's. Closed at once as a deletion is, purged as
    soon as requests in flight have settled (``SETTLE``, 20 minutes: no grace, no
    cancelling), and audited. A staff request: open until the purge answers it."""
    if not actor:
        raise Forbidden("a child's account is marked by staff")
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT jurisdiction, status FROM accounts WHERE id = $1 FOR UPDATE", account_id)
        if row is None:
            raise NotFound("account not found")
        purge_after = now + SETTLE
        if row["status"] == "deleting":  # already leaving: bring its purge forward
            await conn.execute("UPDATE accounts SET purge_after = least(purge_after, $2), "
                               "deletion_kind = 'child' WHERE id = $1", account_id, purge_after)
        else:
            await _close(conn, redis, names, account_id, now, purge_after, "child")
            await requests.record(conn, account_id, "deletion", row["jurisdiction"], now,
                                  "staff")
        await audit.record(conn, actor, "account.child", f"account:{account_id}",
                           account_id, {"purge_after": purge_after.isoformat()})
    await redis.publish(names.session_revocations, ALL)
    log.info("account marked as a child's account_id=%s", account_id)
    return Pending(now, purge_after)
