"""``GET /api/v1/account/export``: the signed-in account's data export, streamed.

Session callers only: the export holds the people's e-mail addresses and sign-in
history, which an API key (a credential that lives in scripts and CI) should not be
able to pull. The document is written as it is read (``export``); the request is
recorded as a self-service access request, fulfilled, once the last byte is written.

An export holds a Postgres connection for as long as it streams, so they are capped:
one at a time per account (a session advisory lock, so across every replica) and
QNP_EXPORTS_PER_PROCESS per process. Over a cap: 429 with Retry-After, in the API's
error format. Imports the web app's guard and state; never ``proxy``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from aiohttp import web

from control_plane.errors import Forbidden
from control_plane.privacy import export, requests, rights
from control_plane.web.errors import json_error
from control_plane.web.guard import caller
from control_plane.web.state import SETTINGS, STORES

# pg_try_advisory_lock(class, key): this class is the export's; the key, the account's.
_LOCK_CLASS = 0x51455850
_LOCK = "SELECT pg_try_advisory_lock($1, hashtext($2::text))"
_UNLOCK = "SELECT pg_advisory_unlock($1, hashtext($2::text))"
RETRY_AFTER_S = 30


@dataclass(slots=True)
class Running:
    """Exports streaming in this process now (the event loop is the only writer)."""

    limit: int
    count: int = 0


RUNNING = web.AppKey("exports_running", Running)


class _Busy(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@asynccontextmanager
async def _slot(running: Running, pool: asyncpg.Pool, account_id: uuid.UUID
                ) -> AsyncIterator[asyncpg.Connection]:
    """A connection holding the account's export lock, within the process's cap
    (checked first: a refused export never waits for a connection)."""
    if running.count >= running.limit:
        raise _Busy("too many data exports are running; try again shortly")
    running.count += 1
    try:
        async with pool.acquire() as conn:
            if not await conn.fetchval(_LOCK, _LOCK_CLASS, str(account_id)):
                raise _Busy("an export of this account is already running; try again "
                            "when it has finished")
            try:
                yield conn
            finally:
                # A connection broken mid-export cannot unlock; the pool's reset on
                # release (pg_advisory_unlock_all) or the session's end does.
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError,
                                         OSError):
                    await conn.fetchval(_UNLOCK, _LOCK_CLASS, str(account_id))
    finally:
        running.count -= 1


async def account_export(request: web.Request) -> web.StreamResponse:
    who = caller(request)
    if who.session is None:
        raise Forbidden("the data export is downloaded from a signed-in session")
    pool = request.app[STORES].pool
    now = datetime.now(UTC)
    response = web.StreamResponse(headers={
        "Content-Type": "application/json",
        "Content-Disposition":
            f'attachment; filename="qnp-export-{now:%Y-%m-%d}.json"',
        "Cache-Control": "no-store",
    })

    async def sink(data: bytes) -> None:
        # Prepared at the first write, so a failure before it is still a clean error.
        if not response.prepared:
            await response.prepare(request)
        await response.write(data)

    try:
        async with _slot(request.app[RUNNING], pool, who.account_id) as conn:
            await export.write_export(conn, who.account_id, now, sink)
    except _Busy as busy:
        refused = json_error(429, busy.message)
        refused.headers["Retry-After"] = str(RETRY_AFTER_S)
        return refused
    await requests.record(pool, who.account_id, "access",
                          await rights.jurisdiction_of(pool, who.account_id), now,
                          "self-service", outcome="fulfilled")
    await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    app[RUNNING] = Running(app[SETTINGS].exports_per_process)
    app.router.add_get("/api/v1/account/export", account_export)
