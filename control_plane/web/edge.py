"""The web service's edge limits, like the proxy's: head sizes (enforced by aiohttp's
parser, configured here), a body cap per route and a deadline for a request's body.

Bodies are read whole, up front, within ``BODY_DEADLINE_S`` (408 past it) and at most
the route's cap (413): a slow or oversized upload never reaches a handler. Never
imports ``proxy``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from control_plane.web.errors import Handler

# aiohttp's request parser: request line, each header, and how many headers.
SERVER_LIMITS: Mapping[str, Any] = {
    "max_line_size": 8190, "max_field_size": 8190, "max_headers": 64,
    # An idle keep-alive connection is closed after this.
    "keepalive_timeout": 30.0,
}
MAX_BODY_BYTES = 64 * 1024  # the largest cap; also aiohttp's client_max_size
DEFAULT_BODY_BYTES = 16 * 1024
BODY_DEADLINE_S = 10.0
# Route templates that take more than the default.
BODY_CAPS: Mapping[str, int] = {
    "/webhooks/stripe": MAX_BODY_BYTES,
}


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.body_exists:
        resource = request.match_info.route.resource
        cap = BODY_CAPS.get(resource.canonical if resource else "", DEFAULT_BODY_BYTES)
        if request.content_length is not None and request.content_length > cap:
            raise web.HTTPRequestEntityTooLarge(max_size=cap,
                                                actual_size=request.content_length)
        try:
            async with asyncio.timeout(BODY_DEADLINE_S):
                body = await request.read()  # kept by aiohttp for json()/post()
        except TimeoutError:
            raise web.HTTPRequestTimeout(reason="request body too slow") from None
        if len(body) > cap:
            raise web.HTTPRequestEntityTooLarge(max_size=cap, actual_size=len(body))
    return await handler(request)
