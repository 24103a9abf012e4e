"""The body of a request that asked to upgrade (``Upgrade: h2c``, websocket …).

llhttp stops at such a request's head and leaves everything after it, body included,
to the protocol upgraded to. We speak only HTTP/1.1 (RFC 9110 lets a server ignore
Upgrade) and answer it as a plain request, so its body must still be read: a second
parser, fed a head with the same framing, reads it and hands it to the connection.

Must not import the server, the handlers, auth, admission, the emitter or Redis.
"""

from __future__ import annotations

from typing import Protocol

import httptools


class BodySink(Protocol):
    def on_body(self, body: bytes) -> None: ...

    def upgrade_body_done(self) -> None: ...


def framing_head(headers: dict[str, str], length: str) -> bytes | None:
    """A head framing the body as the request's did; None if it has no body."""
    if "transfer-encoding" in headers:
        framing = b"Transfer-Encoding: chunked"
    elif length.isdigit() and int(length) > 0:
        framing = b"Content-Length: " + length.encode()
    else:
        return None
    return b"POST / HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n"


class UpgradeBody:
    """Parser callbacks for that body; ``feed`` raises httptools' errors as usual."""

    __slots__ = ("sink", "parser")

    def __init__(self, sink: BodySink, head: bytes) -> None:
        self.sink = sink
        self.parser = httptools.HttpRequestParser(self)
        self.parser.feed_data(head)

    def feed(self, data: bytes | memoryview) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.sink.on_body(body)

    def on_message_complete(self) -> None:
        self.sink.upgrade_body_done()
