"""The proxy's HTTP/1.1 server with a scripted handler, driven over raw sockets.

What a client would notice: answers to pipelined requests swapped, ``curl`` waiting a
second on ``Expect: 100-continue``, a HTTP/1.0 client handed chunked framing it cannot
read, a body on a HEAD answer, malformed requests hanging or crashing the server, and
a request whose client left still running (and still paying its upstream).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.http_server import HttpServer, Reply, Request, StreamReply

BAD = Reply(400, b'{"error":{"message":"Malformed HTTP request."}}')
INTERNAL = Reply(500, b'{"error":{"message":"internal"}}')


class Script:
    """The handler: echoes the path (after an optional delay), or streams on /stream."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, request: Request) -> Reply | StreamReply:
        if request.path == "/slow":
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.path == "/stream":
            out = StreamReply(200, {"Content-Type": "text/event-stream"})
            await out.prepare(request)
            for i in range(3):
                await out.write(b"data: %d\n\n" % i)
            await out.write_eof()
            return out
        if request.path == "/boom":
            raise RuntimeError("a bug")
        return Reply(200, request.path.encode() + b" " + request.body, {"x-n": "1"})


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Script]]:
    script = Script()
    server = HttpServer(script, max_body=1024, bad_request=BAD, internal_error=INTERNAL,
                        keepalive_timeout=0.5)
    port = await server.start("127.0.0.1", 0)
    yield port, script
    await server.shutdown(1.0)


async def _exchange(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):  # hang guard
            return await reader.read(-1) if until_close else await reader.read(65536)
    finally:
        writer.close()
        await writer.wait_closed()


def _post(path: str, body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path.encode(), len(body), extra, body))


async def test_pipelined_requests_are_answered_in_order(served: tuple[int, Script]) -> None:
    port, _ = served
    raw = await _exchange(port, _post("/a", b"1") + _post("/b", b"2")
                          + _post("/c", b"3", b"Connection: close\r\n"))
    bodies = [part.split(b"\r\n\r\n", 1)[1][:4] for part in raw.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"/a 1", b"/b 2", b"/c 3"]
    assert raw.count(b"x-n: 1\r\n") == 3


async def test_expect_100_continue_is_answered_before_the_body(
        served: tuple[int, Script]) -> None:
    port, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"ok")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and await reader.readexactly(5) == b"/e ok"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_streams_are_chunked_for_http11_and_close_delimited_for_http10(
        served: tuple[int, Script]) -> None:
    port, _ = served
    raw11 = await _exchange(port, _post("/stream", extra=b"Connection: close\r\n"))
    assert b"Transfer-Encoding: chunked\r\n" in raw11
    assert raw11.endswith(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
    raw10 = await _exchange(port, b"POST /stream HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    assert b"Transfer-Encoding" not in raw10 and b"Connection: close\r\n" in raw10
    assert raw10.endswith(b"\r\n\r\ndata: 0\n\ndata: 1\n\ndata: 2\n\n")


async def test_head_gets_headers_without_a_body(served: tuple[int, Script]) -> None:
    port, _ = served
    raw = await _exchange(port, b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"Content-Length: 3\r\n"
                                                                 b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("garbage", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
])
async def test_malformed_requests_get_400_and_a_closed_connection(
        served: tuple[int, Script], garbage: bytes) -> None:
    port, _ = served
    raw = await _exchange(port, garbage)
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert raw.endswith(BAD.body)


async def test_an_upgrade_is_answered_as_plain_http_then_closed(
        served: tuple[int, Script]) -> None:
    port, _ = served
    raw = await _exchange(port, b"GET /u HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                b"Connection: Upgrade\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"/u ")


async def test_a_handler_bug_is_a_500_and_the_server_keeps_serving(
        served: tuple[int, Script]) -> None:
    port, _ = served
    raw = await _exchange(port, _post("/boom") + _post("/after", extra=b"Connection: close\r\n"))
    assert raw.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert raw.endswith(b"/after {}")


async def test_a_client_that_leaves_cancels_its_request(served: tuple[int, Script]) -> None:
    port, script = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post("/slow"))
    async with asyncio.timeout(5):
        await script.started.wait()
        writer.close()
        await writer.wait_closed()
        await script.cancelled.wait()


async def test_an_idle_keepalive_connection_is_closed(served: tuple[int, Script]) -> None:
    port, _ = served
    raw = await _exchange(port, _post("/k"))  # keep-alive; read until the server closes
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"/k {}")


async def test_a_body_over_the_limit_is_refused_unread(served: tuple[int, Script]) -> None:
    port, _ = served
    raw = await _exchange(port, b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    # The handler sees the request marked too large (it answers in its API's format).
    assert raw.startswith(b"HTTP/1.1 200 OK") and b"Connection: close\r\n" in raw
    assert raw.endswith(b"/big ")
