"""The ``consent_records`` table: recording a choice, the current state derived from the
rows, attaching a browser's choices to an account at sign-in, and the history for the
export. Every statement about the table lives here. Imports asyncpg only; never
``proxy`` or the web app.

A purpose with no row is not granted: consent is opt-in.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

import asyncpg

PURPOSES = ("functional", "analytics", "marketing_email")
SOURCES = ("banner", "settings", "gpc", "unsubscribe", "signup", "policy_change")

Executor: TypeAlias = asyncpg.Pool | asyncpg.Connection


class InvalidConsent(ValueError):
    """A choice naming an unknown purpose or source, or neither account nor browser."""


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    id: int
    account_id: uuid.UUID | None
    browser_id: uuid.UUID | None
    purpose: str
    granted: bool
    source: str
    policy_version: str
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class ConsentState:
    """The latest choice per purpose; ``decided`` is False until any choice was made
    (the banner shows until then)."""

    granted: frozenset[str]
    decided: frozenset[str]
    policy_version: str | None  # of the latest choice, None when there is none

    def __contains__(self, purpose: object) -> bool:
        return purpose in self.granted


NOTHING = ConsentState(frozenset(), frozenset(), None)


def _check(purpose: str, source: str, account_id: uuid.UUID | None,
           browser_id: uuid.UUID | None) -> None:
    if purpose not in PURPOSES:
        raise InvalidConsent(f"unknown consent purpose {purpose!r}")
    if source not in SOURCES:
        raise InvalidConsent(f"unknown consent source {source!r}")
    if account_id is None and browser_id is None:
        raise InvalidConsent("a consent record needs an account or a browser")


async def record(conn: Executor, *, purpose: str, granted: bool, source: str,
                 policy_version: str, account_id: uuid.UUID | None = None,
                 browser_id: uuid.UUID | None = None,
                 at: datetime | None = None) -> None:
    """Append one choice. ``at`` defaults to the database's now()."""
    _check(purpose, source, account_id, browser_id)
    await conn.execute(
        "INSERT INTO consent_records (account_id, browser_id, purpose, granted, source, "
        "policy_version, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7, now()))",
        account_id, browser_id, purpose, granted, source, policy_version, at)


async def record_many(conn: Executor, choices: dict[str, bool], *, source: str,
                      policy_version: str, account_id: uuid.UUID | None = None,
                      browser_id: uuid.UUID | None = None,
                      at: datetime | None = None) -> None:
    """Append one row per purpose in ``choices`` (a banner's "save"), in one statement."""
    for purpose in choices:
        _check(purpose, source, account_id, browser_id)
    purposes = list(choices)
    await conn.execute(
        "INSERT INTO consent_records (account_id, browser_id, purpose, granted, source, "
        "policy_version, recorded_at) "
        "SELECT $1, $2, p, g, $5, $6, COALESCE($7, now()) "
        "FROM unnest($3::text[], $4::boolean[]) AS c(p, g)",
        account_id, browser_id, purposes, [choices[p] for p in purposes], source,
        policy_version, at)


_LATEST = (
    "SELECT DISTINCT ON (purpose) purpose, granted, policy_version FROM consent_records "
    "WHERE {where} ORDER BY purpose, recorded_at DESC, id DESC")


async def current(conn: Executor, *, account_id: uuid.UUID | None = None,
                  browser_id: uuid.UUID | None = None) -> ConsentState:
    """The state of an account (when given) or else of a browser before sign-in."""
    if account_id is not None:
        rows = await conn.fetch(_LATEST.format(where="account_id = $1"), account_id)
    elif browser_id is not None:
        rows = await conn.fetch(
            _LATEST.format(where="browser_id = $1 AND account_id IS NULL"), browser_id)
    else:
        return NOTHING
    if not rows:
        return NOTHING
    return ConsentState(
        granted=frozenset(r["purpose"] for r in rows if r["granted"]),
        decided=frozenset(r["purpose"] for r in rows),
        policy_version=max(r["policy_version"] for r in rows))


async def attach(conn: Executor, browser_id: uuid.UUID, account_id: uuid.UUID) -> int:
    """Copy a browser's choices made before sign-in onto the account, keeping their
    times and sources; choices the account made later still win. Returns rows copied.
    Idempotent: a browser's rows are copied once per account."""
    status = await conn.execute(
        "INSERT INTO consent_records (account_id, browser_id, purpose, granted, source, "
        "policy_version, recorded_at) "
        "SELECT $2, b.browser_id, b.purpose, b.granted, b.source, b.policy_version, "
        "b.recorded_at FROM consent_records b "
        "WHERE b.browser_id = $1 AND b.account_id IS NULL AND NOT EXISTS ("
        "  SELECT 1 FROM consent_records a WHERE a.account_id = $2 "
        "  AND a.browser_id = $1 AND a.purpose = b.purpose "
        "  AND a.recorded_at = b.recorded_at) "
        "ORDER BY b.id", browser_id, account_id)
    return int(status.rsplit(" ", 1)[-1])


async def history(conn: Executor, account_id: uuid.UUID) -> list[ConsentRecord]:
    """Every choice of the account, oldest first (for the export and settings)."""
    rows = await conn.fetch(
        "SELECT id, account_id, browser_id, purpose, granted, source, policy_version, "
        "recorded_at FROM consent_records WHERE account_id = $1 ORDER BY recorded_at, id",
        account_id)
    return [ConsentRecord(**dict(r.items())) for r in rows]
