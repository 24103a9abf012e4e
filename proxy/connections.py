"""HTTP/1.1 to the upstreams: keep-alive connections per origin, parsed by httptools.

The proxy sends one kind of request upstream (a POST with a small JSON body) and relays
the response as it comes, so it needs little of a general HTTP client: per request, a
pooled connection, the request written as one buffer, the status and headers, then
body bytes as they arrive with the transfer encoding (Content-Length, chunked, or
until close) taken off. aiohttp's client did the same at several times the CPU per
request (per-request timeout objects, tracing hooks, cookie and redirect handling),
which made it the largest cost left after Redis. httptools is llhttp, the parser
Node.js uses, as uvicorn uses it.

Backpressure: a response buffers at most ``buffer_limit`` bytes; past that the socket
stops being read until the relay has taken them, so a slow client slows the upstream
instead of filling memory. A response not read to its end closes its connection (the
upstream then stops generating); one read to its end returns it to the pool. Pooled
connections idle longer than ``keepalive`` are closed rather than reused, to stay
under upstreams' own idle timeouts. Host names are resolved once per five minutes, and
each of a host's addresses is tried in turn. Requests ask for ``Accept-Encoding: identity``:
bytes are relayed and scanned as sent, so they must not be compressed.

Must not import the handlers, auth, admission or the emitter.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

_DNS_TTL = 300.0  # seconds an upstream host's addresses are reused


class UpstreamIOError(Exception):
    """The upstream connection failed or sent something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL taken apart once: where to connect and what to put in the request line."""

    origin: tuple[str, str, int]  # scheme, host, port
    start: bytes  # request line and Host header


class Response:
    """One upstream response: ``status``, ``headers`` (lower-case names), then the body
    through ``readany`` / ``read``; ``release`` or ``close`` when done."""

    __slots__ = ("status", "headers", "_conn", "_chunks", "_buffered", "_eof", "_error",
                 "_waiter", "_read_timeout", "_silent_since", "_watch")

    def __init__(self, conn: _Connection, read_timeout: float) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn: _Connection | None = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._read_timeout = read_timeout
        self._silent_since = 0.0  # loop time the current wait for bytes began
        self._watch: asyncio.TimerHandle | None = None  # the read-timeout watch

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def readany(self, deadline: float | None = None) -> bytes:
        """The bytes read and not yet taken (waiting for some); b"" at the end.

        Raises TimeoutError after ``read_timeout`` of silence (or at ``deadline``, loop
        time, when given), ``UpstreamIOError`` if the connection broke before the end
        of the body."""
        while not self._chunks:
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait(deadline)
        # Everything buffered, as one: a stream's HTTP chunks (one per SSE event) that
        # arrived together go to the client in one write. At most about two reads'
        # worth (reading pauses past ``buffer_limit``), so writes to a slow client stay
        # small.
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._conn is not None:
            self._conn.resume()
        return data

    async def read(self, limit: int = -1, deadline: float | None = None) -> bytes:
        """The rest of the body (at most ``limit`` bytes when given)."""
        parts: list[bytes] = []
        size = 0
        while limit < 0 or size < limit:
            data = await self.readany(deadline)
            if not data:
                break
            parts.append(data)
            size += len(data)
        body = b"".join(parts)
        return body if limit < 0 else body[:limit]

    async def _wait(self, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        if deadline is not None:  # the first bytes: a timer of their own
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            return
        # Silence past the read timeout, watched by one timer per response that re-arms
        # itself, rather than a timer per wait: this runs once per chunk of every open
        # stream, and thousands of timers churning through the loop's heap showed in
        # the paced-stream profile.
        self._silent_since = loop.time()
        if self._watch is None:
            self._watch = loop.call_at(self._silent_since + self._read_timeout, self._check)
        try:
            await waiter
        finally:
            self._waiter = None

    def _check(self) -> None:
        waiter, loop = self._waiter, asyncio.get_running_loop()
        if waiter is None:  # not waiting now: look again a read timeout from now
            done = self._conn is None or self._eof or self._error is not None
            self._watch = None if done else loop.call_later(self._read_timeout, self._check)
            return
        quiet_until = self._silent_since + self._read_timeout
        if loop.time() >= quiet_until:
            self._watch = None
            _expire(waiter)
        else:
            self._watch = loop.call_at(quiet_until, self._check)

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _feed(self, data: bytes) -> bool:
        """Buffer ``data``; False once the buffer is full (stop reading the socket)."""
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()
        return self._buffered < (self._conn.limit if self._conn is not None else 0)

    def _finish(self) -> None:
        self._eof = True
        self._unwatch()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self._eof:
            self._error = error
            self._unwatch()
            self._wake()

    def release(self) -> None:
        """Done with a body read to its end: the connection goes back to the pool."""
        self._unwatch()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done(reusable=self._eof)

    def close(self) -> None:
        """Done before the end: the connection is closed."""
        self._unwatch()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.done(reusable=False)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; at most one response in flight.

    Reads land in the pool's one shared buffer (httptools copies out what it keeps),
    so a read is never larger than ``buffer_limit`` and no connection owns a buffer.
    """

    def __init__(self, pool: ConnectionPool, origin: tuple[str, str, int]) -> None:
        self.pool, self.origin, self.limit = pool, origin, pool.buffer_limit
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.headers_in: asyncio.Future[None] | None = None
        self.idle_since = 0.0
        self.keep_alive = False
        self.framed = False  # Content-Length or chunked: the end is not the close
        self.paused = False
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pool.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.response is None:  # nothing asked: an idle connection talking is broken
            self.abort()
            return
        try:
            self.parser.feed_data(self.pool.read_buffer[:nbytes])
        except httptools.HttpParserError as e:
            self._failed(UpstreamIOError(f"malformed upstream response: {e}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is None or response._eof:
            return
        if self.headers_in is None and not self.framed:
            response._finish()  # a body delimited by the close has ended
        else:
            self._failed(UpstreamIOError("upstream closed the connection mid-response"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        key = name.decode("latin-1").lower()
        self.response.headers[key] = value.decode("latin-1")
        if key in ("content-length", "transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        assert self.response is not None and self.headers_in is not None
        self.response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if not self.headers_in.done():
            self.headers_in.set_result(None)
        self.headers_in = None

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        if not self.response._feed(body) and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response._finish()

    # used by Response and the pool
    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _failed(self, error: BaseException) -> None:
        if self.headers_in is not None and not self.headers_in.done():
            self.headers_in.set_exception(error)
            self.headers_in.exception()  # retrieved: the sender may have gone
        if self.response is not None:
            self.response._fail(error)

    def done(self, *, reusable: bool) -> None:
        self.response = None
        if reusable and self.keep_alive and not self.closed and not self.paused:
            self.idle_since = time.monotonic()
            self.pool.put_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class ConnectionPool:
    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive: float = 30.0,
        buffer_limit: int = 2**16,
        max_idle_per_origin: int = 512,
    ) -> None:
        self.buffer_limit = buffer_limit
        self.read_buffer = memoryview(bytearray(buffer_limit))
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive = keepalive
        self._max_idle = max_idle_per_origin
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None
        self._addresses: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._closed = False

    async def post(self, url: str, headers: Mapping[str, str], body: bytes,
                   deadline: float) -> Response:
        """Send a POST; return once the response's status and headers are in. Raises
        TimeoutError if they are not in by ``deadline`` (loop time)."""
        target = self._target(url)
        conn = await self._acquire(target.origin, deadline)
        assert conn.transport is not None
        response = conn.response = Response(conn, self._read_timeout)
        loop = asyncio.get_running_loop()
        headers_in = conn.headers_in = loop.create_future()
        conn.framed = False
        head = [target.start, b"Content-Length: %d\r\n" % len(body)]
        head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()]
        head.append(b"\r\n")
        conn.transport.write(b"".join(head) + body)
        timer = loop.call_at(deadline, _expire, headers_in)  # cheaper than asyncio.timeout
        try:
            await headers_in
        except BaseException:
            response.close()
            raise
        finally:
            timer.cancel()
        return response

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamIOError(f"not an http(s) URL: {parts.scheme}://...")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            default = port == (443 if parts.scheme == "https" else 80)
            host = parts.hostname if default else f"{parts.hostname}:{port}"
            start = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
                     "Accept-Encoding: identity\r\nConnection: keep-alive\r\n")
            if len(self._targets) > 10_000:
                self._targets.clear()
            target = self._targets[url] = _Target(
                (parts.scheme, parts.hostname, port), start.encode("latin-1"))
        return target

    async def _acquire(self, origin: tuple[str, str, int], deadline: float) -> _Connection:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn
            conn.abort()
        return await self._connect(origin, deadline)

    async def _connect(self, origin: tuple[str, str, int], deadline: float) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        async with asyncio.timeout_at(min(deadline, loop.time() + self._connect_timeout)):
            error: OSError = OSError(f"no address for {host}")
            for address in await self._resolve(host, port):
                try:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self, origin), address, port, ssl=tls,
                        server_hostname=host if tls else None,
                    )
                    return conn
                except OSError as e:  # the next address may answer
                    error = e
            self._addresses.pop((host, port), None)
            raise error

    async def _resolve(self, host: str, port: int) -> list[str]:
        """The host's addresses, looked up at most once per ``_DNS_TTL`` (a lookup per
        new connection would put the resolver on the path whenever load grows)."""
        cached = self._addresses.get((host, port))
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if len(self._addresses) > 1_000:
            self._addresses.clear()
        self._addresses[(host, port)] = (now + _DNS_TTL, addresses)
        return addresses

    def put_back(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if self._closed or len(idle) >= self._max_idle:
            conn.abort()
        else:
            idle.append(conn)

    def close(self) -> None:
        """Close every idle connection (those in use close when their response ends)."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
