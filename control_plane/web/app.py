"""The public web application: its routes and middlewares, composed once.

Never imports ``proxy``.
"""

from __future__ import annotations

from aiohttp import web

from control_plane.runtime import Stores
from control_plane.settings import Settings


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_web_app(settings: Settings, stores: Stores) -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    return app
