"""The web service's edge limits, like the proxy's: head sizes (enforced by aiohttp's
parser, configured here), a deadline for a request's head, a body cap per route and a
deadline for a request's body.

A connection must deliver a complete request head within ``HEAD_DEADLINE_S`` of
opening, and again of its previous request finishing: a client trickling its headers
(or holding an idle connection) is closed, counted in ``HeadDeadline.closed``. Bodies
are read whole, up front, within ``BODY_DEADLINE_S`` (408 past it) and at most the
route's cap (413): a slow or oversized upload never reaches a handler. Never imports
``proxy``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
HEAD_DEADLINE_S = 10.0

log = logging.getLogger(__name__)
# Route templates that take more than the default.
BODY_CAPS: Mapping[str, int] = {
    "/webhooks/stripe": MAX_BODY_BYTES,
}


@dataclass(slots=True)
class _Connection:
    transport: asyncio.BaseTransport
    heads: int = 0  # request heads parsed so far
    inflight: int = 0
    heads_at_arm: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class HeadDeadline:
    """Wraps a listener's protocol factory; the ``edge`` middleware reports each request
    head to it (by transport), and a timer closes connections that sent none in time."""

    def __init__(self, deadline_s: float = HEAD_DEADLINE_S) -> None:
        self._deadline_s = deadline_s
        self._connections: dict[int, _Connection] = {}
        self.closed = 0

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Deadlined(inner(), self)

    def opened(self, transport: asyncio.BaseTransport) -> None:
        conn = self._connections[id(transport)] = _Connection(transport)
        self._arm(conn)

    def gone(self, transport: asyncio.BaseTransport) -> None:
        conn = self._connections.pop(id(transport), None)
        if conn is not None and conn.timer is not None:
            conn.timer.cancel()

    def started(self, transport: asyncio.BaseTransport | None) -> _Connection | None:
        conn = self._connections.get(id(transport)) if transport is not None else None
        if conn is not None:
            conn.heads += 1
            conn.inflight += 1
        return conn

    def _arm(self, conn: _Connection) -> None:
        conn.heads_at_arm = conn.heads
        conn.timer = asyncio.get_running_loop().call_later(self._deadline_s, self._expire,
                                                          conn)

    def _expire(self, conn: _Connection) -> None:
        if conn.inflight or conn.heads > conn.heads_at_arm:
            self._arm(conn)  # busy, or a new head came in: the next one gets a deadline
            return
        self.closed += 1
        log.debug("connection closed: no request head within %.0f s", self._deadline_s)
        conn.transport.close()


class _Deadlined(asyncio.Protocol):
    """Delegates to aiohttp's protocol, telling ``HeadDeadline`` when it opens and ends."""

    def __init__(self, inner: asyncio.Protocol, deadline: HeadDeadline) -> None:
        self._inner, self._deadline = inner, deadline
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._deadline.opened(transport)
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._deadline.gone(self._transport)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


HEADS = web.AppKey("head_deadline", HeadDeadline)


@web.middleware
async def heads(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: a request head arrived; its connection is busy until it is answered."""
    conn = request.app[HEADS].started(request.transport) if HEADS in request.app else None
    try:
        return await handler(request)
    finally:
        if conn is not None:
            conn.inflight -= 1


@web.middleware
async def bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    await read_body(request)
    return await handler(request)


async def read_body(request: web.Request) -> bytes:
    """The request's body, read once within the deadline and the route's cap (aiohttp
    keeps it for ``json()`` and ``post()``)."""
    body = b""
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
        except ConnectionError:  # the client went away mid-body; nobody reads the answer
            raise web.HTTPBadRequest(reason="request body incomplete") from None
        if len(body) > cap:
            raise web.HTTPRequestEntityTooLarge(max_size=cap, actual_size=len(body))
    return body
