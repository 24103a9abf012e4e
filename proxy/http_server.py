"""The client-facing HTTP/1.1 server: connections, request parsing, responses, flow control.

A request is parsed by httptools (llhttp) into a ``Request`` whose body is already
read; one task per request runs the handler, which returns a ``Reply`` (written as one
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

Must not import the handlers, auth, admission, the emitter or Redis.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import cast
from urllib.parse import parse_qsl

import httptools

log = logging.getLogger("qnp.proxy.http")

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class Request:
    """One parsed request. Header names are lower-case; the body is read in full."""

    __slots__ = ("method", "path", "query_string", "headers", "body", "remote",
                 "keep_alive", "too_large", "match_info", "_query", "_conn")

    def __init__(self, conn: _Connection, method: str, url: bytes, headers: dict[str, str],
                 body: bytes, keep_alive: bool, too_large: bool = False) -> None:
        path, _, query = url.decode("latin-1").partition("?")
        self.method = method
        self.path = path
        self.query_string = query
        self.headers = headers
        self.body = body
        self.remote = conn.remote
        self.keep_alive = keep_alive
        self.too_large = too_large  # the body was over the limit and was not kept
        self.match_info: dict[str, str] = {}
        self._query: dict[str, str] | None = None
        self._conn = conn

    @property
    def query(self) -> Mapping[str, str]:
        if self._query is None:
            self._query = dict(parse_qsl(self.query_string, keep_blank_values=True))
        return self._query


class Reply:
    """A complete response, written as one buffer once the handler returns it."""

    __slots__ = ("status", "body", "headers", "content_type")

    def __init__(self, status: int = 200, body: bytes = b"",
                 headers: Mapping[str, str] | None = None,
                 content_type: str | None = "application/json") -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.content_type = content_type


class StreamReply:
    """A response sent as it is produced: ``prepare``, ``write``…, ``write_eof``.

    ``write`` waits while the client's socket buffer is full (backpressure) and raises
    ``ConnectionResetError`` once the client has gone.
    """

    __slots__ = ("status", "headers", "prepared", "ended", "_conn", "_chunked")

    def __init__(self, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self.status = status
        self.headers = headers or {}
        self.prepared = False
        self.ended = False
        self._conn: _Connection | None = None
        self._chunked = True

    async def prepare(self, request: Request) -> None:
        conn = self._conn = request._conn
        # HTTP/1.0 knows no chunked encoding: its stream ends when the connection does.
        self._chunked = conn.http11
        if not self._chunked:
            request.keep_alive = False
        conn.write(_head(conn.server.date(), self.status, self.headers, None,
                         None if self._chunked else -1, request.keep_alive))
        self.prepared = True

    async def write(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None, "write before prepare"
        if data:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        if conn.write_paused or conn.closed:  # the common case costs no coroutine
            await conn.drain()

    async def write_eof(self) -> None:
        if not self.ended and self._conn is not None:
            self.ended = True
            if self._chunked:
                self._conn.write(_LAST_CHUNK)


Handler = Callable[[Request], Awaitable[Reply | StreamReply]]


def _head(date: bytes, status: int, headers: Mapping[str, str], content_type: str | None,
          length: int | None, keep_alive: bool) -> bytes:
    """Status line and headers. ``length`` None: chunked; -1: until the close."""
    parts = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode(),
             b"Date: ", date, b"\r\n"]
    if content_type is not None:
        parts.append(f"Content-Type: {content_type}\r\n".encode("latin-1"))
    for name, value in headers.items():
        if "\r" not in value and "\n" not in value:  # never let a value split the head
            parts.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
    if length is None:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif length >= 0:
        parts.append(b"Content-Length: %d\r\n" % length)
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.http11 = True
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.body_size = 0
        self.refusing = False  # read no more: a body over the limit, or an upgrade
        self.close_after = False
        self.queue: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self.server.connections.add(self)
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: its upstream request stops too
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        if self.refusing:
            return  # the rest of a body we refused: not buffered, the connection closes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # We speak only HTTP/1.1 (RFC 9110 lets a server ignore Upgrade): the
            # request is answered as a plain one, then the connection closes.
            self.refusing = self.close_after = True
        except httptools.HttpParserError:
            self._reject(self.server.bad_request)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers, self.body, self.body_size = b"", {}, [], 0
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.http11 = self.parser.get_http_version() == "1.1"
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.server.max_body:
            self._refuse_body()
        elif self.headers.get("expect", "").lower() == "100-continue" and self.transport:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self.refusing:
            return
        self.body_size += len(body)
        if self.body_size > self.server.max_body:
            self._refuse_body()
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.refusing:
            return
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self._enqueue(Request(self, self.parser.get_method().decode("latin-1"), self.url,
                              self.headers, body, self.parser.should_keep_alive()))

    # requests and responses
    def _refuse_body(self) -> None:
        """Hand the handler an empty request marked too large now, read no more of it,
        and close after its answer."""
        self.refusing = True
        self.body = []
        self._enqueue(Request(self, self.parser.get_method().decode("latin-1"), self.url,
                              self.headers, b"", keep_alive=False, too_large=True))

    def _enqueue(self, request: Request) -> None:
        self.queue.append(request)
        if self.task is None:
            self._next()
        elif self.transport is not None:
            self.transport.pause_reading()  # pipelined: one waits, the rest stay unread

    def _next(self) -> None:
        request = self.queue.popleft()
        self.task = self.loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            reply = await self.server.handler(request)
        except Exception as e:  # the handler's own top level failed: answer, log
            log.error("unhandled %s answering %s %s", type(e).__name__, request.method,
                      request.path)
            reply = self.server.internal_error
        try:
            if isinstance(reply, Reply):
                body = b"" if request.method == "HEAD" else reply.body
                self.write(_head(self.server.date(), reply.status, reply.headers,
                                 reply.content_type, len(reply.body), request.keep_alive)
                           + body)
            elif not reply.prepared:
                log.error("a stream reply was returned unprepared for %s", request.path)
                request.keep_alive = False
            else:
                await reply.write_eof()
        except ConnectionResetError:
            return  # the client left while we answered: nothing more to do
        finally:
            self.task = None
        if self.closed:
            return
        if not request.keep_alive or self.close_after or self.server.draining:
            self.close()
        elif self.queue:
            self._next()
            if not self.queue and self.transport is not None:
                self.transport.resume_reading()
        else:
            self._idle()

    def _reject(self, reply: Reply) -> None:
        """Answer a request that cannot be parsed, and close."""
        if self.task is None and not self.closed and self.transport is not None:
            self.transport.write(_head(self.server.date(), reply.status, reply.headers,
                                       reply.content_type, len(reply.body), False)
                                 + reply.body)
        self.close()

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        if self.write_paused:
            self.drain_waiter = self.loop.create_future()
            await self.drain_waiter
            if self.closed:
                raise ConnectionResetError("the client closed the connection")

    def _wake_drain(self) -> None:
        waiter, self.drain_waiter = self.drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _idle(self) -> None:
        self.idle_timer = self.loop.call_later(self.server.keepalive_timeout, self.close)

    @property
    def busy(self) -> bool:
        return self.task is not None or bool(self.queue)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class HttpServer:
    """Listens and serves; ``handler`` answers every parsed request."""

    def __init__(self, handler: Handler, *, max_body: int, bad_request: Reply,
                 internal_error: Reply, keepalive_timeout: float = 75.0) -> None:
        self.handler = handler
        self.max_body = max_body
        self.bad_request = bad_request
        self.internal_error = internal_error
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[_Connection] = set()
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

    async def start(self, host: str, port: int, *, backlog: int = 4096) -> int:
        """Listen (SO_REUSEPORT, so worker processes share the port); the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=True, backlog=backlog)
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
