"""The HTTP/1.1 messages the proxy's server hands out and takes back: the parsed
``Request``, a complete ``Reply`` and a ``StreamReply`` written as it is produced, plus
the status line and headers of an answer (``response_head``).

Owned here so that the connection (``proxy.http_connection``) and the server
(``proxy.http_server``) share them; handlers import them from ``proxy.http_server``.
Must not import the handlers, auth, admission, the emitter or Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from proxy.http_connection import Connection

_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_LAST_CHUNK = b"0\r\n\r\n"


class Request:
    """One parsed request. Header names are lower-case; the body is read in full by
    the time the handler sees it (``head_check`` sees it empty).

    ``client_ip``: the real client IP (``CF-Connecting-IP`` from a trusted proxy, else
    the peer). ``body_refused``: the body was not read (``head_check`` said no, or it
    was over the limit, when ``too_large`` is also set); the connection closes after
    the answer. ``principal``: free for the handler's verdict on the request's key.
    """

    __slots__ = ("method", "path", "query_string", "headers", "body", "remote",
                 "client_ip", "keep_alive", "too_large", "body_refused", "principal",
                 "match_info", "_query", "_conn", "_check")

    def __init__(self, conn: Connection, method: str, url: bytes, headers: dict[str, str],
                 keep_alive: bool, client_ip: str | None) -> None:
        path, _, query = url.decode("latin-1").partition("?")
        self.method = method
        self.path = path
        self.query_string = query
        self.headers = headers
        self.body = b""
        self.remote = conn.remote
        self.client_ip = client_ip
        self.keep_alive = keep_alive
        self.too_large = False  # the body was over the limit and was not kept
        self.body_refused = False
        self.principal: object | None = None
        self.match_info: dict[str, str] = {}
        self._query: dict[str, str] | None = None
        self._conn = conn
        self._check: asyncio.Future[bool] | None = None  # head_check still out

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
        self._conn: Connection | None = None
        self._chunked = True

    async def prepare(self, request: Request) -> None:
        conn = self._conn = request._conn
        # HTTP/1.0 knows no chunked encoding: its stream ends when the connection does.
        self._chunked = conn.http11
        if not self._chunked:
            request.keep_alive = False
        conn.write(response_head(conn.server.date(), self.status, self.headers, None,
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
# True: read the body; False: do not (the handler answers it at once, then we close);
# an awaitable of either: reading pauses until it resolves.
HeadCheck = Callable[[Request], bool | Awaitable[bool]]


def default_reply(status: int) -> Reply:
    """An OpenAI-style error, for a server that was given no ``replies``."""
    phrase = HTTPStatus(status).phrase
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = b'{"error":{"message":"%s.","type":"%s","param":null,"code":"%s"}}' % (
        phrase.encode(), kind.encode(), phrase.lower().replace(" ", "_").replace("-", "_").encode())
    return Reply(status, body, {"Retry-After": "1"} if status in (429, 503) else None)


def response_head(date: bytes, status: int, headers: Mapping[str, str], content_type: str | None,
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
