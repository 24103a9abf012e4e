"""Loading and saving the choices a page works with, on top of ``records`` (which owns
the ``consent_records`` table's meaning): one statement per page for the state a page
needs (the latest row per purpose and, for an account, its restriction), and saving a
choice so that the browser follows it too. Imports asyncpg and ``records``; never the
web app or ``proxy``.

Why ``load`` is its own statement and not ``records.current``: a page also needs the
account's ``restricted_at`` and each purpose's own policy version (the banner asks
again when *its* purposes were chosen under an older policy), and one indexed statement
per page is the whole cost of consent on a page.
"""

from __future__ import annotations

import uuid

import asyncpg

from control_plane.consent import records
from control_plane.consent.records import ConsentState, Executor
from control_plane.consent.view import BANNER_PURPOSES, Loaded, gpc_pending

_ACCOUNT = (
    "SELECT a.restricted_at IS NOT NULL AS restricted, c.purpose, c.granted, "
    "c.policy_version FROM accounts a LEFT JOIN LATERAL ("
    "SELECT DISTINCT ON (purpose) purpose, granted, policy_version FROM consent_records "
    "WHERE account_id = a.id ORDER BY purpose, recorded_at DESC, id DESC"
    ") c ON true WHERE a.id = $1")
_BROWSER = (
    "SELECT DISTINCT ON (purpose) purpose, granted, policy_version FROM consent_records "
    "WHERE browser_id = $1 AND account_id IS NULL ORDER BY purpose, recorded_at DESC, id DESC")

NOTHING = Loaded(records.NOTHING, None, frozenset())


def _loaded(rows: list[asyncpg.Record], restricted: bool) -> Loaded:
    rows = [r for r in rows if r["purpose"] is not None]
    if not rows:
        return Loaded(records.NOTHING, None, frozenset(), restricted)
    state = ConsentState(granted=frozenset(r["purpose"] for r in rows if r["granted"]),
                         decided=frozenset(r["purpose"] for r in rows),
                         policy_version=max(r["policy_version"] for r in rows))
    banner = [r["policy_version"] for r in rows if r["purpose"] in BANNER_PURPOSES]
    return Loaded(state, min(banner) if banner else None,
                  frozenset(r["purpose"] for r in rows if not r["granted"]), restricted)


async def load(conn: Executor, *, account_id: uuid.UUID | None = None,
               browser_id: uuid.UUID | None = None) -> Loaded:
    """The account's state (when given), else the browser's before sign-in."""
    if account_id is not None:
        rows = await conn.fetch(_ACCOUNT, account_id)
        return _loaded(rows, bool(rows and rows[0]["restricted"]))
    if browser_id is not None:
        return _loaded(await conn.fetch(_BROWSER, browser_id), False)
    return NOTHING


async def save(pool: asyncpg.Pool, choices: dict[str, bool], *, source: str,
               policy_version: str, account_id: uuid.UUID | None,
               browser_id: uuid.UUID | None) -> None:
    """Record a choice for the account (when signed in) and for the browser.

    A choice made while signed in is also written as the browser's own row, in the same
    transaction (so with the same ``recorded_at``): after signing out, the sign-in page
    follows the latest choice (a withdrawal holds), and ``records.attach`` at the next
    sign-in sees the account row with that browser and time and copies nothing twice.
    """
    if not choices:
        return
    async with pool.acquire() as conn, conn.transaction():
        if account_id is not None:
            await records.record_many(conn, choices, source=source,
                                      policy_version=policy_version,
                                      account_id=account_id, browser_id=browser_id)
        browser_choices = {p: g for p, g in choices.items() if p in BANNER_PURPOSES}
        if browser_id is not None and browser_choices:
            await records.record_many(conn, browser_choices, source=source,
                                      policy_version=policy_version, browser_id=browser_id)


async def record_gpc(pool: asyncpg.Pool, account_id: uuid.UUID, loaded: Loaded,
                     policy_version: str) -> bool:
    """Record the GPC signal for a signed-in account: analytics and marketing e-mail
    withdrawn with source ``gpc``, once (nothing when both are withdrawn already).
    Returns whether anything was written."""
    pending = gpc_pending(loaded)
    if not pending:
        return False
    await records.record_many(pool, dict.fromkeys(pending, False), source="gpc",
                              policy_version=policy_version, account_id=account_id)
    return True
