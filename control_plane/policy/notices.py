"""The e-mail to every user on a material policy change (policy clause 13): a job that
queues ONE transactional message per user through the outbox, in batches, rate
limited, resumable after a crash and never twice.

Never twice: each batch, in one transaction, inserts a ``policy_notices`` marker per
(user, version) (``ON CONFLICT DO NOTHING``) and queues an outbox row only for the
markers it inserted, so a marker exists if and only if its message was queued. A run
killed at any point has committed whole batches only; the next run skips every user
with a marker. Two runs at once cannot queue one user twice either: the second one's
insert waits for the first's uncommitted marker and then inserts nothing. Delivery is
the outbox sender's (``mail.sender``), with its own crash safety.

Rate limited: at most ``rate_per_s`` messages are queued per second, so a change to a
million users' policy trickles into the outbox instead of standing in front of every
sign-in notice queued after it (the sender sends the oldest due row first).

Logs counts and the version; never an address. Imports ``mail.outbox`` and
``policy.versions``; never ``proxy`` or the web app.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from control_plane.errors import InvalidInput
from control_plane.mail import outbox
from control_plane.mail.outbox import MailKind

log = logging.getLogger(__name__)

TEMPLATE = "policy_change"
DEFAULT_BATCH = 200
DEFAULT_RATE_PER_S = 20.0

# The next users by id after $3 without a marker for version $1: each user once
# (DISTINCT ON: a user in several accounts gets one message, about the first).
_BATCH = """
WITH picked AS (
    SELECT DISTINCT ON (u.id) u.id, u.email, m.account_id
    FROM users u JOIN memberships m ON m.user_id = u.id
    JOIN accounts a ON a.id = m.account_id AND a.status <> 'deleting'  -- no more e-mail
    WHERE u.id > $3 AND NOT EXISTS (
        SELECT 1 FROM policy_notices n WHERE n.user_id = u.id AND n.version = $1)
    ORDER BY u.id, m.created_at
    LIMIT $2),
marked AS (
    INSERT INTO policy_notices (user_id, version) SELECT id, $1 FROM picked
    ON CONFLICT DO NOTHING RETURNING user_id)
SELECT p.id, p.email, p.account_id, k.user_id IS NOT NULL AS marked
FROM picked p LEFT JOIN marked k ON k.user_id = p.id
ORDER BY p.id
"""

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Run:
    version: str
    queued: int
    batches: int


def message(version: str, published: str, summary: str, public_url: str) -> tuple[str, str]:
    """(subject, body) of the notice; the same for every user (no name, no address)."""
    subject = f"QNP's privacy policy has changed (version {version})"
    body = (
        "Hello,\n\n"
        f"We have made a material change to QNP's privacy policy. The new version, "
        f"{version}, applies from {published}.\n\n"
        f"What changed: {summary}\n\n"
        f"Read the whole policy: {public_url}/privacy\n\n"
        "You receive this e-mail because you have a QNP account: every user is told of a "
        "material change to the policy (clause 13). It is not marketing and needs no "
        "consent.\n")
    return subject, body


async def _material(conn: asyncpg.Connection, version: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT version, published_on, material, summary FROM policy_versions "
        "WHERE version = $1", version)
    if row is None:
        raise InvalidInput(f"policy version {version!r} is not in the database "
                           "(start the web role once to seed it)")
    if not row["material"]:
        raise InvalidInput(f"policy version {version!r} is not a material change: "
                           "no e-mail is due")
    return row


async def _queue(conn: asyncpg.Connection, rows: list[asyncpg.Record], version: str,
                 subject: str, body: str) -> list[tuple[uuid.UUID, int]]:
    """One outbox row per marked user; (user, outbox row) of each queued."""
    queued = []
    for r in rows:
        try:
            row_id = await outbox.enqueue(
                conn, to_address=r["email"], kind=MailKind.TRANSACTIONAL, template=TEMPLATE,
                subject=subject, body=body, account_id=r["account_id"])
        except outbox.OutboxError:
            # Checked before any insert, so the batch goes on; the marker stays (with no
            # outbox row) so the address is not retried on every run.
            log.warning("policy notice not queued user=%s version=%s: unusable address",
                        r["id"], version)
            continue
        if row_id is not None:  # None: the account's deletion began meanwhile
            queued.append((r["id"], row_id))
    return queued


async def notify(pool: asyncpg.Pool, version: str, public_url: str, *,
                 batch: int = DEFAULT_BATCH, rate_per_s: float = DEFAULT_RATE_PER_S,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> Run:
    """Queue the notice of ``version`` for every user who has none yet; how many."""
    if batch < 1 or not rate_per_s > 0:
        raise InvalidInput("batch must be at least 1 and the rate above 0")
    async with pool.acquire() as conn:
        row = await _material(conn, version)
    subject, body = message(version, row["published_on"].isoformat(), row["summary"],
                            public_url)
    started, queued, batches = clock(), 0, 0
    after = uuid.UUID(int=0)
    while True:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_BATCH, version, batch, after)
            if not rows:
                break
            queued_ids = await _queue(conn, [r for r in rows if r["marked"]], version,
                                      subject, body)
            await conn.executemany(
                "UPDATE policy_notices SET outbox_id = $3 WHERE user_id = $1 AND version = $2",
                [(user, version, row_id) for user, row_id in queued_ids])
        after = rows[-1]["id"]  # ordered by id: the next batch starts after it
        queued += len(queued_ids)
        batches += 1
        log.info("policy notices queued version=%s batch=%d total=%d", version,
                 len(queued_ids), queued)
        wait = started + queued / rate_per_s - clock()
        if wait > 0:
            await sleep(wait)
    log.info("policy notices done version=%s queued=%d batches=%d", version, queued, batches)
    return Run(version, queued, batches)


async def progress(conn: asyncpg.Pool | asyncpg.Connection, version: str) -> int:
    """Users whose notice of ``version`` is queued."""
    found: int = await conn.fetchval(
        "SELECT count(*) FROM policy_notices WHERE version = $1", version)
    return found
