"""People: users, their sign-in identities, account memberships and what they accepted.

A first sign-in creates nothing here: the verified identity waits in Redis (``signup``
in ``shared.redis_names``) until the person confirms 18+ and accepts the terms and the
privacy policy; ``sign_up`` then writes the account, the user, the identity, the owner
membership and the three acceptances (with the policy version) in one transaction.
A second identity is linked to a user only from a signed-in session (``link``), never
because an email matches. Logs ids, never emails or names. Never imports ``proxy``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import asyncpg
import orjson
import redis.asyncio as aioredis

from control_plane.auth.oidc import Identity
from control_plane.errors import Conflict
from control_plane.publisher import AccountState, publish_state
from shared.redis_names import RedisNames

log = logging.getLogger(__name__)

ACCEPTED = ("age_18", "terms", "privacy_policy")
ACCOUNT_NAME = "Personal"


@dataclass(frozen=True, slots=True)
class Member:
    user_id: uuid.UUID
    account_id: uuid.UUID
    status: str


def identity_to_json(identity: Identity) -> bytes:
    return orjson.dumps({"provider": identity.provider, "subject": identity.subject,
                         "email": identity.email, "email_verified": identity.email_verified,
                         "name": identity.name})


def identity_from_json(raw: bytes | str) -> Identity:
    d = orjson.loads(raw)
    return Identity(provider=d["provider"], subject=d["subject"], email=d["email"],
                    email_verified=bool(d["email_verified"]), name=d["name"])


async def find_member(conn: asyncpg.Pool | asyncpg.Connection, provider: str, subject: str
                      ) -> Member | None:
    """The user (and the account they own) who signs in with this identity."""
    row = await conn.fetchrow(
        "SELECT u.id, m.account_id, u.status FROM identities i "
        "JOIN users u ON u.id = i.user_id JOIN memberships m ON m.user_id = u.id "
        "WHERE i.provider = $1 AND i.subject = $2 ORDER BY m.created_at LIMIT 1",
        provider, subject)
    if row is None:
        return None
    await conn.execute("UPDATE identities SET last_used_at = now() "
                       "WHERE provider = $1 AND subject = $2", provider, subject)
    return Member(row["id"], row["account_id"], row["status"])


async def email_taken(conn: asyncpg.Pool | asyncpg.Connection, email: str) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM users WHERE lower(email) = lower($1))", email))


async def sign_up(conn: asyncpg.Connection, redis: aioredis.Redis, names: RedisNames,
                  identity: Identity, policy_version: str) -> Member:
    """Account, user, identity, membership and acceptances; call inside a transaction."""
    if identity.email is None or not identity.email_verified:
        raise Conflict("a verified email is required")
    account_id, user_id = uuid.uuid4(), uuid.uuid4()
    await conn.execute("INSERT INTO accounts (id, name) VALUES ($1, $2)",
                       account_id, ACCOUNT_NAME)
    try:
        await conn.execute(
            "INSERT INTO users (id, email, email_verified, display_name) "
            "VALUES ($1, $2, $3, $4)",
            user_id, identity.email, identity.email_verified, identity.name)
    except asyncpg.UniqueViolationError:
        raise Conflict("an account with this email already exists") from None
    try:
        await conn.execute(
            "INSERT INTO identities (provider, subject, user_id, email) VALUES ($1, $2, $3, $4)",
            identity.provider, identity.subject, user_id, identity.email)
    except asyncpg.UniqueViolationError:
        raise Conflict("this sign-in is already linked to an account") from None
    await conn.execute(
        "INSERT INTO memberships (account_id, user_id, role) VALUES ($1, $2, 'owner')",
        account_id, user_id)
    await conn.executemany(
        "INSERT INTO acceptances (user_id, what, policy_version) VALUES ($1, $2, $3)",
        [(user_id, what, policy_version) for what in ACCEPTED])
    await publish_state(redis, names, AccountState(account_id, "active", {}, 0, 0))
    log.info("user signed up user_id=%s account_id=%s provider=%s", user_id, account_id,
             identity.provider)
    return Member(user_id, account_id, "active")


async def link(conn: asyncpg.Pool | asyncpg.Connection, user_id: uuid.UUID,
               identity: Identity) -> None:
    """Add a sign-in identity to a signed-in user."""
    try:
        await conn.execute(
            "INSERT INTO identities (provider, subject, user_id, email) VALUES ($1, $2, $3, $4)",
            identity.provider, identity.subject, user_id, identity.email)
    except asyncpg.UniqueViolationError:
        raise Conflict("this sign-in is already linked to an account") from None
    log.info("identity linked user_id=%s provider=%s", user_id, identity.provider)


async def profile(conn: asyncpg.Pool | asyncpg.Connection, user_id: uuid.UUID
                  ) -> dict[str, object]:
    row = await conn.fetchrow(
        "SELECT email, display_name, created_at FROM users WHERE id = $1", user_id)
    providers = await conn.fetch(
        "SELECT provider FROM identities WHERE user_id = $1 ORDER BY created_at", user_id)
    assert row is not None
    return {"email": row["email"], "name": row["display_name"],
            "created_at": row["created_at"].isoformat(),
            "providers": [p["provider"] for p in providers]}


async def owner_address(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID
                        ) -> str | None:
    """The e-mail address of the account's active owner, for transactional mail; None
    for an account nobody signs in to."""
    address: str | None = await conn.fetchval(
        "SELECT u.email FROM memberships m JOIN users u ON u.id = m.user_id "
        "WHERE m.account_id = $1 AND m.role = 'owner' AND u.status = 'active' "
        "ORDER BY m.created_at LIMIT 1", account_id)
    return address
