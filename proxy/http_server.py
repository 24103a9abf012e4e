"""The client-facing HTTP/1.1 server: connections, request parsing, responses, flow control.

A request is parsed by httptools (llhttp) into a ``Request`` whose body is already
read (``head_check``, if given, sees it first with its head only); one task per
request runs the handler, which returns a ``Reply`` (written as one
buffer: status line, headers and body) or streams through a ``StreamReply`` (chunked
transfer encoding, waiting while the client's socket is full). aiohttp's server did the
same with several times the CPU per request (multidict headers, a payload writer per
response, a router with middlewares); the profile put it first once Redis and the
upstream client were lean. The shape follows uvicorn's httptools protocol.

Behaviour a client relies on: keep-alive (closed after ``keepalive_timeout`` idle, or
when the client asks), pipelined requests answered in order, ``Expect: 100-continue``,
bodies over ``max_body`` refused without being buffered, a client that disconnects
cancels its request's task (so the upstream request is cancelled too), malformed HTTP
answered 400 and closed. ``shutdown`` stops accepting, lets requests in flight finish
for the grace period, then cancels what is left.

What no client may do (``proxy.http_limits``): hold a connection with a head that never
ends or a body that trickles (408), send an oversized URL (414) or head (431, counted
as bytes arrive, before llhttp accumulates them), hold more connections than its cap
(429) or than the process's (503), fill the process with bodies being read (503),
queue requests behind answers it never reads (we stop reading and answering until it
reads; 429 past ``max_pipelined``). Each refusal is reported to ``on_reject`` with a
reason from ``RejectReason``. HTTP/1.1 without exactly one Host, and any version but
1.0 and 1.1, are refused (400 / 505). A closed connection drops its buffers and
parser at once, so its memory does not wait for the cyclic GC.

Must not import the handlers, auth, admission, the emitter or Redis.
"""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
from collections.abc import Callable

from proxy.http_connection import Connection
from proxy.http_limits import (
    REJECT_STATUSES,
    ClientIps,
    HttpLimits,
    Network,
    RejectCounter,
    RejectReason,
)
from proxy.http_messages import (
    Handler,
    HeadCheck,
    Reply,
    Request,
    StreamReply,
    default_reply,
)

__all__ = ["Handler", "HeadCheck", "HttpLimits", "HttpServer", "Reply", "Request",
           "StreamReply"]


def _uncounted(_reason: RejectReason) -> None:
    """``on_reject`` when nobody counts the refusals."""


class HttpServer:
    """Listens and serves; ``handler`` answers every parsed request.

    ``head_check`` (optional) sees every request once its head is in, body or not (a
    request without a body is checked too, so the handler can rely on it), and decides
    whether its body is read (see ``HeadCheck``); ``100 Continue`` goes out only after
    it said yes. A check that raises is logged and counts as a no (one that raises at
    once: the request is answered 400). ``on_reject`` counts the server's own refusals
    by reason; ``replies`` builds the answer for each status the server sends itself
    (400, 408, 414, 429, 431, 503, 505; ``bad_request`` and ``internal_error`` override
    400 and 500). ``connections`` and ``buffered_body`` are there to be watched.
    """

    def __init__(self, handler: Handler, *, max_body: int, bad_request: Reply | None = None,
                 internal_error: Reply | None = None, keepalive_timeout: float = 75.0,
                 limits: HttpLimits | None = None, trusted_proxies: tuple[Network, ...] = (),
                 head_check: HeadCheck | None = None, on_reject: RejectCounter | None = None,
                 replies: Callable[[int], Reply] | None = None) -> None:
        limits = limits or HttpLimits()
        build = replies or default_reply
        self.handler = handler
        self.head_check = head_check
        self.on_reject: RejectCounter = on_reject or _uncounted
        self.replies = {status: build(status) for status in REJECT_STATUSES}
        if bad_request is not None:
            self.replies[400] = bad_request
        self.bad_request = self.replies[400]
        self.internal_error = internal_error or build(500)
        self.max_body = max_body
        self.keepalive_timeout = keepalive_timeout
        self.head_timeout = limits.head_timeout
        self.body_rate_window = limits.body_rate_window
        self.body_shift = limits.body_rate_window - limits.head_timeout
        self.window_bytes = limits.min_body_rate * limits.body_rate_window
        self.tick = min(limits.head_timeout, limits.body_rate_window, keepalive_timeout)
        self.max_url = limits.max_url
        self.max_head = limits.max_head
        self.max_headers = limits.max_headers
        self.max_connections = limits.max_connections
        self.max_buffered_body = limits.max_buffered_body
        self.max_pipelined = limits.max_pipelined
        self.ips = ClientIps(trusted_proxies, limits.max_connections_per_ip)
        self.buffered_body = 0  # body bytes being read, all connections
        self.connections: set[Connection] = set()
        self.draining = False
        self._server: asyncio.Server | None = None
        self._second = 0
        self._date = b""

    def date(self) -> bytes:
        """The Date header's value, formatted at most once per second."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    async def start(self, host: str, port: int, *, backlog: int = 4096,
                    tls: ssl.SSLContext | None = None) -> int:
        """Listen (SO_REUSEPORT, so worker processes share the port); the bound port.

        With ``tls``, every connection is TLS: a connection is handed to us only once
        its handshake is done, and a handshake gets ``head_timeout``, as a head does,
        so a client cannot hold a socket by stalling before its first request.
        """
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), host, port, reuse_port=True, backlog=backlog, ssl=tls,
            ssl_handshake_timeout=self.head_timeout if tls is not None else None)
        return int(self._server.sockets[0].getsockname()[1])

    async def shutdown(self, grace: float) -> None:
        """No new connections; requests in flight get ``grace`` seconds, then cancelled."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        deadline = asyncio.get_running_loop().time() + grace
        while any(c.busy for c in self.connections):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)
        tasks = [c.task for c in self.connections if c.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self.connections):
            conn.close()
