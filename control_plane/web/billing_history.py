"""The billing history's downloads (h20): ``GET /credits/history.csv`` (a signed-in
session; others go to sign-in and back) and ``GET /api/v1/credits/history`` (a session
or a management key). The rows are ``billing.history``'s, the same as the credits page
shows; only the caller's own account's. Never imports ``proxy``.
"""

from __future__ import annotations

import csv
import io

import orjson
from aiohttp import web

from control_plane.billing import history
from control_plane.errors import Forbidden
from control_plane.web.dashboard import session_of
from control_plane.web.guard import caller
from control_plane.web.state import STORES


async def history_csv(request: web.Request) -> web.Response:
    session = session_of(request)
    found = await history.payments(request.app[STORES].pool, session.account_id)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(history.COLUMNS)
    writer.writerows(p.row() for p in found)
    return web.Response(body=buffer.getvalue().encode(), headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": 'attachment; filename="qnp-payments.csv"'})


async def history_json(request: web.Request) -> web.Response:
    who = caller(request)
    if not who.may_manage:
        raise Forbidden("this needs a management key or a signed-in session")
    found = await history.payments(request.app[STORES].pool, who.account_id)
    return web.Response(body=orjson.dumps({"data": [p.to_json() for p in found]}),
                        content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/credits/history.csv", history_csv)
    app.router.add_get("/api/v1/credits/history", history_json)
