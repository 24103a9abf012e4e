"""One client connection of the proxy's HTTP/1.1 server: parsing (httptools / llhttp),
the request queue, flow control, deadlines and the per-connection limits.

Protocol notes (see ``proxy.http_server`` for what a client relies on): the head is
counted as bytes arrive, before llhttp accumulates a header (httptools joins a header's
pieces by concatenation, quadratic in its size); a refused request stops the parser
(``_Stop``) rather than letting it chew through the rest of what arrived.

Timers: at most one per connection, re-armed lazily. Requests only move ``deadline`` (a
float); the timer, when it fires, re-arms itself for the deadline it finds, and is never
armed further than ``tick`` (the shortest of the head, keep-alive and body-rate
timeouts) ahead, so a deadline set after it (a head starting on an idle connection)
is not missed.

Must not import the handlers, auth, admission, the emitter or Redis.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, cast

import httptools

from proxy.http_limits import ClientIps, RejectReason
from proxy.http_messages import Reply, Request, response_head
from proxy.http_upgrade import UpgradeBody, framing_head

if TYPE_CHECKING:
    from proxy.http_server import HttpServer

log = logging.getLogger("qnp.proxy.http")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# What a connection waits for from its client (the deadline's meaning).
_IDLE, _HEAD, _BODY = 0, 1, 2


class _Stop(Exception):
    """Raised from a parser callback once the request is refused: llhttp stops there
    instead of parsing (and accumulating) the rest of what arrived."""


class Connection(asyncio.Protocol):
    """A client connection: parse, queue, answer in order, time out, refuse."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.trusted = False  # the peer is a trusted proxy: the client is in a header
        self.ip_pending = False  # a trusted peer's client IP is counted at its first head
        self.counted_ip: str | None = None
        self.forwarded: tuple[str | None, str | None] = (None, None)  # header, its IP
        self.http11 = True
        self.url = b""
        self.headers: dict[str, str] = {}
        self.dup_host = False
        self.current: Request | None = None  # its head is parsed, its body is being read
        self.body: list[bytes] = []
        self.body_size = 0  # also counted in server.buffered_body until released
        self.in_head = True
        self.head_room = server.max_head  # head bytes still allowed
        self.phase = _HEAD
        self.deadline = 0.0
        self.body_mark = 0
        self.timer: asyncio.TimerHandle | None = None
        self.refusing = False  # read no more: a body refused, an upgrade, a rejection
        self.rejected = False
        self.linger = True  # a refusal half-closes first (see ``_finish``)
        self.final: Reply | None = None  # a rejection sent once the queued are answered
        self.upgrade_head: bytes | None = None
        self.body_parser: UpgradeBody | None = None
        self.close_after = False
        self.queue: deque[Request] = deque()
        self.checks = 0  # head checks still out
        self.held: list[bytes] = []  # what arrived meanwhile, unparsed
        self.held_size = 0
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.write_paused = False
        self.reading = True
        self.drain_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        server = self.server
        server.connections.add(self)
        now = self.loop.time()
        self.deadline = now + server.head_timeout
        self._arm(now)
        if server.max_connections is not None and len(server.connections) > \
                server.max_connections:
            self.linger = False  # refused at the door: nothing to read, keep no socket
            self._reject(503, "conn_limit_process")
            return
        ips = server.ips
        self.trusted = ips.is_trusted(self.remote)
        if ips.limit is not None:
            if self.trusted:
                self.ip_pending = True
            elif self.remote is not None:
                if not ips.acquire(self.remote):
                    self.linger = False
                    self._reject(429, "conn_limit_ip")
                    return
                self.counted_ip = self.remote

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        server = self.server
        server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted_ip is not None:
            server.ips.release(self.counted_ip)
            self.counted_ip = None
        self._release_body()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: its upstream request stops too
        for request in (*self.queue, self.current):
            if request is not None and request._check is not None:
                request._check.cancel()
        self._wake_drain()
        # Free what the connection held now: the parser and the connection refer to each
        # other (as do queued requests), so otherwise a body would wait for the cyclic GC.
        self.queue.clear()
        self.current = self.final = None
        self.url, self.headers, self.held = b"", {}, []
        self.body_parser = None
        del self.parser

    def data_received(self, data: bytes | memoryview) -> None:
        if self.checks:
            self._hold(data)
            return
        if self.refusing:
            if self.body_parser is not None:
                self._feed_upgrade_body(data)
            return  # the rest of a body we refused: not buffered, the connection closes
        if self.in_head:
            n = len(data)
            if n > self.head_room:
                self._feed_head_bounded(data)
                return
            self.head_room -= n
        self._feed(data)

    def _feed(self, data: bytes | memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgrade(data, int(e.args[0]) if e.args else len(data))
        except httptools.HttpParserError as e:
            if self.refusing:
                return  # we stopped the parser ourselves (``_Stop``)
            if isinstance(e, httptools.HttpParserCallbackError):
                log.error("parser callback failed: %r", e.__context__)
            self._reject(400, "bad_request")

    def _feed_head_bounded(self, data: bytes | memoryview) -> None:
        """Feed no more than the head may still take; past it: 431, unparsed."""
        room, view = self.head_room, memoryview(data)
        self.head_room = 0
        self._feed(view[:room])
        if self.closed:
            return
        if self.refusing:
            if self.body_parser is not None:  # an upgrade: the rest is its body
                self._feed_upgrade_body(view[room:])
        elif self.in_head:
            self._reject(431, "head_too_large")
        else:
            self.data_received(view[room:])  # a body, or the next request (counted anew)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause_reading()  # a client that does not read gets nothing more parsed

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()
        if self.task is None and self.queue:
            self._next()
        self._resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers, self.dup_host = b"", {}, False
        self.phase = _HEAD
        self.deadline = self.loop.time() + self.server.head_timeout

    def on_url(self, url: bytes) -> None:
        url = self.url = self.url + url
        if len(url) > self.server.max_url:
            self._reject(414, "url_too_long")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key == "host" and key in self.headers:
            self.dup_host = True
        self.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.refusing:
            return
        self.in_head = False
        server, parser, headers = self.server, self.parser, self.headers
        version = parser.get_http_version()
        if version == "1.1" and "host" in headers and not self.dup_host:
            self.http11 = True
        elif version != "1.0" or self.dup_host:
            self._bad_head(version)
        else:
            self.http11 = False
        if len(headers) > server.max_headers:
            self._reject(431, "too_many_headers")
            raise _Stop
        request = self.current = Request(
            self, parser.get_method().decode("latin-1"), self.url, headers,
            parser.should_keep_alive(), self._client_ip() if self.trusted else self.remote)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > server.max_body:
            request.too_large = True
            self._refuse_body(request)
            raise _Stop
        check = server.head_check
        if check is not None:
            verdict = check(request)
            if verdict is not True:  # a plain True (the common case) costs nothing more
                if verdict is False:
                    self._refuse_body(request)
                    raise _Stop
                self._await_check(request, verdict)
        if "upgrade" in headers and parser.should_upgrade():
            self._upgrading(headers, length)
        if request._check is None and "expect" in headers:
            self._continue(request)
        self.phase = _BODY
        self.deadline += server.body_shift  # the head's start + the body's first window
        self.body_mark = 0

    def on_body(self, body: bytes) -> None:
        if self.refusing:
            return
        n = len(body)
        self.body_size += n
        server = self.server
        server.buffered_body += n
        if self.body_size > server.max_body and self.current is not None:
            self.current.too_large = True
            self._refuse_body(self.current)
            raise _Stop
        if server.buffered_body > server.max_buffered_body:
            self._reject(503, "body_buffer_full")
            raise _Stop
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.refusing:
            return
        request, body = self.current, self.body
        assert request is not None  # on_headers_complete made it
        if body:
            request.body = body[0] if len(body) == 1 else b"".join(body)
            self.body = []
        if self.body_size:
            self._release_body()
        self.current = None
        self.phase = _IDLE
        self.in_head, self.head_room = True, self.server.max_head
        if self.queue and len(self.queue) >= self.server.max_pipelined:
            self._reject(429, "pipeline_limit")
            raise _Stop
        self._enqueue(request)

    # the head check, the body, an upgrade
    def _bad_head(self, version: str) -> None:
        """HTTP/1.1 without exactly one Host (RFC 9112 3.2), or a version we do not
        speak: HTTP/0.9 (no version on the request line) or 2.0 is never served as 1.1."""
        self._reject(505 if version >= "2" else 400, "bad_request")
        raise _Stop

    def _client_ip(self) -> str | None:
        """The client a trusted proxy names (counted at the connection's first head);
        a proxy's connection names the same client request after request, so the last
        answer is kept."""
        value = self.headers.get("cf-connecting-ip")
        if value != self.forwarded[0]:
            self.forwarded = (value, ClientIps.forwarded(value, self.remote))
        client_ip = self.forwarded[1]
        if self.ip_pending:
            self._count_client(client_ip)
        return client_ip

    def _count_client(self, client_ip: str | None) -> None:
        self.ip_pending = False
        if client_ip is not None:
            if not self.server.ips.acquire(client_ip):
                self._reject(429, "conn_limit_ip")
                raise _Stop
            self.counted_ip = client_ip

    def _await_check(self, request: Request, verdict: Awaitable[bool]) -> None:
        """Parse nothing more until the check is in (what llhttp already has of this
        chunk is still parsed: at most one read's worth, within the body limit)."""
        check = request._check = asyncio.ensure_future(verdict)
        self.checks += 1
        check.add_done_callback(functools.partial(self._checked, request))

    def _hold(self, data: bytes | memoryview) -> None:
        """What arrives while a check is out waits unparsed. Reading goes on up to a
        head's worth, so that a client that leaves is noticed (and its check cancelled)."""
        self.held.append(bytes(data))
        self.held_size += len(data)
        if self.held_size >= self.server.max_head:
            self._pause_reading()

    def _checked(self, request: Request, check: asyncio.Future[bool]) -> None:
        request._check = None
        self.checks -= 1
        if self.closed:
            return
        if not check.cancelled():  # cancelled: refused meanwhile, its verdict is moot
            self._verdict(request, check)
        if self.task is None and self.queue and not self.write_paused:
            self._next()
        if self.held and not self.checks:
            held, self.held, self.held_size = b"".join(self.held), [], 0
            self.data_received(held)
        if not self.closed:
            self._resume_reading()
            if self.task is None and not self.checks:
                self._settle()

    def _verdict(self, request: Request, check: asyncio.Future[bool]) -> None:
        exc = check.exception()
        if exc is not None:
            log.error("head check failed: %r", exc)  # refused: the handler answers it
        if exc is None and check.result() is True:
            if request is self.current:
                self._continue(request)
        elif request is self.current:
            self._refuse_body(request)
        elif request in self.queue and not request.body_refused:
            # Its body was already here: drop it, and everything pipelined behind it.
            request.body, request.body_refused, request.keep_alive = b"", True, False
            while self.queue[-1] is not request:
                self.queue.pop()
            self.refusing = True
            self._release_body()
            self.current = None

    def _continue(self, request: Request) -> None:
        if self.transport is not None \
                and request.headers.get("expect", "").lower() == "100-continue":
            self.transport.write(_CONTINUE)

    def _refuse_body(self, request: Request) -> None:
        """Hand the handler the request now without its body, read no more, and close
        after its answer."""
        self.refusing = True
        self._release_body()
        request.body, request.body_refused, request.keep_alive = b"", True, False
        check, request._check = request._check, None
        if check is not None:
            check.cancel()  # its verdict no longer matters (``_checked`` still runs)
        self.current = None
        self.phase = _IDLE
        self._enqueue(request)

    def _release_body(self) -> None:
        self.server.buffered_body -= self.body_size
        self.body_size = 0
        self.body = []

    def _upgrading(self, headers: dict[str, str], length: str) -> None:
        """An upgrade: answered as HTTP/1.1, then closed (what follows would be the
        other protocol's); llhttp will not read its body, ``UpgradeBody`` will."""
        if self.current is not None:
            self.current.keep_alive = False
        self.upgrade_head = framing_head(headers, length)
        if self.upgrade_head is not None:
            self.refusing = True  # skip the body-less completion llhttp reports next

    def _upgrade(self, data: bytes | memoryview, offset: int) -> None:
        self.close_after = self.refusing = True
        head, self.upgrade_head = self.upgrade_head, None
        if head is not None:
            self.body_parser = UpgradeBody(self, head)
            self._feed_upgrade_body(data[offset:])

    def _feed_upgrade_body(self, data: bytes | memoryview) -> None:
        assert self.body_parser is not None
        self.refusing = False
        try:
            self.body_parser.feed(data)
        except httptools.HttpParserError:
            if not self.refusing:
                self._reject(400, "bad_request")
        finally:
            if self.body_parser is not None:
                self.refusing = True

    def upgrade_body_done(self) -> None:
        self.body_parser = None
        self.on_message_complete()
        self.refusing = True

    # requests and responses
    def _enqueue(self, request: Request) -> None:
        self.queue.append(request)
        if self.task is None and not self.write_paused:
            self._next()
        else:
            self._pause_reading()  # pipelined: one waits, the rest stay unread

    def _next(self) -> None:
        request = self.queue[0]
        if request._check is not None:
            return  # started once its head check is in
        self.queue.popleft()
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
                self.write(response_head(self.server.date(), reply.status, reply.headers,
                                         reply.content_type, len(reply.body),
                                         request.keep_alive) + body)
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
            self._finish()
        elif self.queue:
            if self.write_paused:  # the client is not reading: answer no more for now
                now = self.loop.time()
                self.deadline = now + self.server.keepalive_timeout
                if self.timer is None:
                    self._arm(now)
                return
            self._next()
            if not self.queue:
                self._resume_reading()
        elif self.final is not None:
            self._send_final(self.final)
        else:
            self._settle()

    def _reject(self, status: int, reason: RejectReason) -> None:
        """Refuse with ``status``: now, or after the answers already owed, and close."""
        self.refusing = True
        if self.rejected:
            return
        self.rejected = True
        self.server.on_reject(reason)
        self._release_body()
        self.current = None
        reply = self.server.replies[status]
        if self.task is None and not self.queue:
            self._send_final(reply)
        else:
            self.final = reply

    def _send_final(self, reply: Reply) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(response_head(self.server.date(), reply.status,
                                               reply.headers, reply.content_type,
                                               len(reply.body), False) + reply.body)
        self._finish()

    def _finish(self) -> None:
        """Close after an answer. With input left unread (a refused body, a rejected
        head), close our side only and drop what still arrives until the client closes
        (at most ``tick``): closing with unread input resets the connection, and the
        reset can destroy the answer before the client reads it."""
        transport = self.transport
        if not self.refusing or not self.linger or transport is None \
                or transport.is_closing() or not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        self.queue.clear()
        if not self.reading:
            self.reading = True
            transport.resume_reading()
        now = self.loop.time()
        self.phase, self.deadline = _IDLE, now + self.server.tick
        if self.timer is None:
            self._arm(now)

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

    def _pause_reading(self) -> None:
        if self.reading and not self.closed and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self.reading and not (self.write_paused or self.queue or self.checks
                                     or self.closed) and self.transport is not None:
            self.reading = True
            self.transport.resume_reading()

    # deadlines
    def _settle(self) -> None:
        """Nothing in flight: restart the clock of what we wait for from the client."""
        now, server = self.loop.time(), self.server
        if self.phase == _IDLE:
            self.deadline = now + server.keepalive_timeout
        elif self.phase == _HEAD:  # a head that began while we were busy: from now
            self.deadline = now + server.head_timeout
        else:
            self.body_mark, self.deadline = self.body_size, now + server.body_rate_window
        if self.timer is None:
            self._arm(now)

    def _arm(self, now: float) -> None:
        """Fire at the deadline, or ``tick`` from now if that is sooner."""
        self.timer = self.loop.call_at(min(self.deadline, now + self.server.tick),
                                       self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.closed or self.task is not None or self.checks:
            return  # busy on our side: _run's end (or the check's) settles the clock
        now, server = self.loop.time(), self.server
        if now < self.deadline:
            self._arm(now)
        elif self.queue or self.phase == _IDLE:
            self.close()  # idle past keep-alive, or answers never read: nothing to say
        elif self.phase == _HEAD:
            self._reject(408, "head_timeout")
        elif self.body_size - self.body_mark < server.window_bytes:
            self._reject(408, "body_rate")
        else:
            self.body_mark, self.deadline = self.body_size, now + server.body_rate_window
            self._arm(now)

    @property
    def busy(self) -> bool:
        return self.task is not None or bool(self.queue)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
