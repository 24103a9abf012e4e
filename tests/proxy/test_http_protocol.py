"""RFC 9112 details and the early head check of the proxy's HTTP/1.1 server.

What a user would notice: a request with no Host or two served (a cache or a second
server in front may read another), HTTP/0.9 or HTTP/2.0 answered as if it were 1.1, a
valid request followed by garbage never answered, an ``Upgrade: h2c`` request losing its
body, and a request with a bad key having its whole body read (and ``100 Continue``
invited) before it is refused.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from proxy.http_server import HttpServer, Reply, Request, StreamReply
from tests.proxy.test_http_limits import _close, _count, _open, _read_all


class Checked:
    """A server whose head check answers by path: /no refuses, /wait-yes and /wait-no
    wait for ``release`` first; the handler says what it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.checked: list[str] = []
        self.cancelled = 0
        self.handled: list[Request] = []
        self.rejected: Counter[str] = Counter()
        self.server: HttpServer | None = None
        self.port = 0

    def check(self, request: Request) -> bool | asyncio.Future[bool]:
        self.checked.append(request.path)
        request.principal = "key-" + request.path
        if request.path.startswith("/wait"):
            return asyncio.ensure_future(self._wait(request.path == "/wait-yes"))
        return request.path != "/no"

    async def _wait(self, verdict: bool) -> bool:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return verdict

    async def handler(self, request: Request) -> Reply | StreamReply:
        self.handled.append(request)
        if request.body_refused:
            return Reply(401, b"refused %s" % str(request.principal).encode())
        return Reply(200, b"%s %s" % (request.path.encode(), request.body))


@pytest.fixture
async def checked() -> AsyncIterator[Checked]:
    c = Checked()
    c.server = HttpServer(c.handler, max_body=1 << 20, head_check=c.check,
                          on_reject=_count(c.rejected))
    c.port = await c.server.start("127.0.0.1", 0)
    yield c
    await c.server.shutdown(1.0)


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await _open(port)
    writer.write(data)
    raw = await _read_all(reader)
    await _close(writer)
    return raw


@pytest.mark.parametrize(("raw_request", "status"), [
    (b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n", b"400"),
    (b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n", b"400"),
    (b"GET /a HTTP/1.0\r\nHost: x\r\nHOST: y\r\n\r\n", b"400"),
    (b"GET /a\r\n\r\n", b"400"),
    (b"GET /a HTTP/0.9\r\n\r\n", b"400"),
    (b"GET /a HTTP/2.0\r\nHost: x\r\n\r\n", b"505"),
], ids=["no-host", "two-hosts", "two-hosts-1.0", "http0.9-style", "http0.9", "http2.0"])
async def test_heads_rfc_9112_refuses_are_refused_and_closed(
        checked: Checked, raw_request: bytes, status: bytes) -> None:
    raw = await _exchange(checked.port, raw_request)
    assert raw.startswith(b"HTTP/1.1 " + status) and b"Connection: close\r\n" in raw
    assert checked.handled == [] and checked.rejected == {"bad_request": 1}


async def test_http10_without_host_is_served(checked: Checked) -> None:
    raw = await _exchange(checked.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"/old ")


async def test_a_valid_request_before_garbage_is_answered_then_400(checked: Checked) -> None:
    raw = await _exchange(checked.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
    first, second = raw.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK") and first.endswith(b"/ok ")
    assert second.startswith(b"400 Bad Request") and b"Connection: close" in second


@pytest.mark.parametrize("framing", [
    b"Content-Length: 11\r\n\r\nhello world",
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
], ids=["content-length", "chunked"])
async def test_an_h2c_upgrade_with_a_body_is_answered_as_http11_with_its_body(
        checked: Checked, framing: bytes) -> None:
    raw = await _exchange(checked.port, b"POST /up HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n"
                                        b"Connection: Upgrade, HTTP2-Settings\r\n"
                                        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n" + framing)
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"/up hello world")
    assert b"Connection: close" in raw


async def test_an_h2c_upgrade_body_arriving_later_is_still_read(checked: Checked) -> None:
    reader, writer = await _open(checked.port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
                 b"Content-Length: 4\r\n\r\nab")
    await asyncio.sleep(0.05)
    writer.write(b"cd")
    raw = await _read_all(reader)
    await _close(writer)
    assert raw.endswith(b"/up abcd")


async def test_a_refused_head_gets_its_answer_without_its_body_being_read(
        checked: Checked) -> None:
    reader, writer = await _open(checked.port)
    writer.write(b"POST /no HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    raw = await _read_all(reader)  # no 100 Continue, and no body was ever sent
    await _close(writer)
    assert raw.startswith(b"HTTP/1.1 401 Unauthorized\r\n") and raw.endswith(b"refused key-/no")
    assert b"Connection: close" in raw and b"100 Continue" not in raw
    (request,) = checked.handled
    assert request.body_refused and request.body == b"" and not request.too_large


async def test_an_accepted_head_gets_100_continue_then_its_body_read(
        checked: Checked) -> None:
    reader, writer = await _open(checked.port)
    writer.write(b"POST /yes HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    async with asyncio.timeout(5):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and await reader.readexactly(7) == b"/yes ok"
    await _close(writer)
    assert checked.handled[0].principal == "key-/yes"


@pytest.mark.parametrize(("path", "answer"), [
    ("/wait-yes", b"HTTP/1.1 200 OK"), ("/wait-no", b"HTTP/1.1 401 Unauthorized")])
async def test_a_check_that_waits_pauses_the_body_until_its_verdict(
        checked: Checked, path: str, answer: bytes) -> None:
    reader, writer = await _open(checked.port)
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                 b"Connection: close\r\nExpect: 100-continue\r\n\r\nab" % path.encode())
    await asyncio.sleep(0.05)
    assert checked.handled == []  # nothing answered while the check is out
    checked.release.set()
    writer.write(b"cd")
    raw = await _read_all(reader)
    await _close(writer)
    assert raw.startswith(answer if path == "/wait-no" else b"HTTP/1.1 100 Continue")
    assert answer in raw and (raw.endswith(b"/wait-yes abcd") or path == "/wait-no")
    (request,) = checked.handled
    assert request.body_refused == (path == "/wait-no")


async def test_pipelined_requests_keep_their_order_around_a_waiting_check(
        checked: Checked) -> None:
    reader, writer = await _open(checked.port)
    writer.write(b"POST /wait-yes HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1"
                 b"POST /yes HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                 b"Connection: close\r\n\r\n2")
    await asyncio.sleep(0.05)
    checked.release.set()
    raw = await _read_all(reader)
    await _close(writer)
    assert raw.index(b"/wait-yes 1") < raw.index(b"/yes 2")


async def test_a_client_that_leaves_during_a_check_leaves_nothing_behind(
        checked: Checked) -> None:
    reader, writer = await _open(checked.port)
    writer.write(b"POST /wait-yes HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
    async with asyncio.timeout(5):
        while not checked.checked:
            await asyncio.sleep(0.01)
    await _close(writer)
    assert checked.server is not None
    async with asyncio.timeout(5):
        while checked.server.connections or not checked.cancelled:
            await asyncio.sleep(0.01)
    assert checked.handled == [] and checked.server.buffered_body == 0


async def test_a_body_over_the_limit_during_a_waiting_check_is_still_answered(
        checked: Checked) -> None:
    assert checked.server is not None
    checked.server.max_body = 1000
    body = b"1388\r\n" + b"z" * 5000 + b"\r\n0\r\n\r\n"  # chunked: over the limit
    raw = await _exchange(checked.port, b"POST /wait-yes HTTP/1.1\r\nHost: x\r\n"  # as
                                        b"Transfer-Encoding: chunked\r\n\r\n" + body)  # it is read
    assert raw.startswith(b"HTTP/1.1 401 ") and raw.endswith(b"refused key-/wait-yes")
    (request,) = checked.handled
    assert request.too_large and request.body_refused


async def test_an_upgrade_body_larger_than_a_head_is_read_whole(checked: Checked) -> None:
    body = b"b" * 200_000  # arrives with the head in reads larger than max_head
    raw = await _exchange(checked.port, b"POST /up HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n"
                                        b"Connection: Upgrade\r\nContent-Length: 200000"
                                        b"\r\n\r\n" + body)
    assert raw.startswith(b"HTTP/1.1 200 OK") and raw.endswith(b"/up " + body)


async def test_a_check_that_fails_is_logged_and_its_body_refused(
        caplog: pytest.LogCaptureFixture) -> None:
    handled: list[Request] = []

    async def broken(_request: Request) -> bool:
        raise LookupError("the key store is gone")

    async def handler(request: Request) -> Reply | StreamReply:
        handled.append(request)
        return Reply(503 if request.body_refused else 200)

    server = HttpServer(handler, max_body=1 << 20, head_check=broken)
    port = await server.start("127.0.0.1", 0)
    try:
        raw = await _exchange(port, b"POST /k HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                                    b"\r\nabc")
    finally:
        await server.shutdown(1.0)
    assert raw.startswith(b"HTTP/1.1 503 ") and handled[0].body_refused
    assert any("head check failed" in r.getMessage() for r in caplog.records)
