"""``GET /api/v1/account/export``: the signed-in account's data export, streamed.

Session callers only: the export holds the people's e-mail addresses and sign-in
history, which an API key (a credential that lives in scripts and CI) should not be
able to pull. The document is written as it is read (``export``); the request is
recorded as a self-service access request, fulfilled, once the last byte is written.
Imports the web app's guard and state; never ``proxy``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from control_plane.errors import Forbidden
from control_plane.privacy import export, requests, rights
from control_plane.web.guard import caller
from control_plane.web.state import STORES


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

    async with pool.acquire() as conn:
        await export.write_export(conn, who.account_id, now, sink)
    await requests.record(pool, who.account_id, "access",
                          await rights.jurisdiction_of(pool, who.account_id), now,
                          "self-service", outcome="fulfilled")
    await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/account/export", account_export)
