"""What one client can hold of the proxy's HTTP/1.1 server, driven over raw sockets.

What a user would notice if these broke: a client that sends one byte, its headers a
byte at a time or its body a trickle holds a connection (and a slot of the process)
forever; huge URLs and heads are read and parsed without end (the parse cost grows
with their square); one client's hundreds of slow connections lock everyone else out;
a pipelining client that never reads makes the proxy buffer answers without bound.
Deadlines here are short (tenths of a second); no test asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable

import httptools
import pytest

from proxy import http_connection
from proxy.http_server import HttpLimits, HttpServer, Reply, Request, StreamReply

SHORT = 0.3  # the deadlines under test, in seconds
BIG = b"x" * 50_000


class Served:
    """A server with a scripted handler; ``rejected`` counts ``on_reject`` reasons."""

    def __init__(self) -> None:
        self.rejected: Counter[str] = Counter()
        self.handled: list[Request] = []
        self.server: HttpServer | None = None
        self.port = 0

    async def handler(self, request: Request) -> Reply | StreamReply:
        self.handled.append(request)
        if request.path == "/big":
            return Reply(200, BIG)
        return Reply(200, b"%s %s %d" % (request.path.encode(),
                                          (request.client_ip or "-").encode(),
                                          len(request.body)))

    async def start(self, **kwargs: object) -> None:
        limits = kwargs.pop("limits", HttpLimits(head_timeout=SHORT, body_rate_window=SHORT,
                                                 min_body_rate=1000))
        kwargs.setdefault("keepalive_timeout", SHORT)
        self.server = HttpServer(self.handler, max_body=1 << 20, limits=limits,
                                 on_reject=_count(self.rejected),
                                 **kwargs)  # type: ignore[arg-type]
        self.port = await self.server.start("127.0.0.1", 0)


def _count(counter: Counter[str]) -> Callable[[str], None]:
    def add(reason: str) -> None:
        counter[reason] += 1
    return add


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    s = Served()
    yield s
    if s.server is not None:
        await s.server.shutdown(1.0)


async def _open(port: int, source: str = "127.0.0.1"
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):  # hang guard, far above every deadline here
        return await reader.read(-1)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def _get(path: str = "/", extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path.encode(), extra)


async def _settled(served: Served) -> None:
    """The server has closed every connection (the clients have all gone)."""
    assert served.server is not None
    async with asyncio.timeout(10):
        while served.server.connections:
            await asyncio.sleep(0.01)
    assert served.server.buffered_body == 0


# -- slow clients ---------------------------------------------------------------------

async def test_a_connection_that_sent_one_byte_gets_408_at_the_head_deadline(
        served: Served) -> None:
    await served.start()
    reader, writer = await _open(served.port)
    writer.write(b"G")
    raw = await _read_all(reader)
    await _close(writer)
    assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert served.rejected == {"head_timeout": 1} and served.handled == []
    await _settled(served)


async def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_deadline(
        served: Served) -> None:
    await served.start()
    reader, writer = await _open(served.port)
    head = _get("/slow", b"X-Pad: " + b"p" * 400 + b"\r\n")
    sent = 0
    reading = asyncio.ensure_future(_read_all(reader))
    with contextlib.suppress(ConnectionError):
        for byte in head:  # bounded: 450 steps at most
            if reading.done():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            await asyncio.sleep(0.01)
    raw = await reading
    await _close(writer)
    assert raw.startswith(b"HTTP/1.1 408 ") and sent < len(head)
    assert served.handled == []


async def test_the_head_deadline_restarts_for_each_request_on_a_kept_alive_connection(
        served: Served) -> None:
    await served.start(limits=HttpLimits(head_timeout=SHORT, body_rate_window=SHORT))
    reader, writer = await _open(served.port)
    writer.write(_get("/one"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" not in head
    writer.write(b"GET /two")  # the next request's head never ends
    raw = await _read_all(reader)
    await _close(writer)
    assert raw.startswith(b"/one 127.0.0.1 0HTTP/1.1 408 Request Timeout\r\n")
    assert [r.path for r in served.handled] == ["/one"]
    assert served.rejected == {"head_timeout": 1}


async def test_a_trickled_body_gets_408_and_a_steady_one_is_served(served: Served) -> None:
    await served.start()  # at least 1000 B/s over every 0.3 s window
    slow_reader, slow = await _open(served.port)
    fast_reader, fast = await _open(served.port)
    length = 60_000
    for w in (slow, fast):
        w.write(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length)
    slow_answer = asyncio.ensure_future(_read_all(slow_reader))
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < length:  # 3,000 B per 0.05 s: 60 kB/s, 60 times the minimum
            fast.write(b"f" * 3000)
            sent += 3000
            if not slow_answer.done():
                slow.write(b"s")  # 20 B/s
            await asyncio.sleep(0.05)
    fast_head = await fast_reader.readuntil(b"\r\n\r\n")
    raw = await slow_answer
    await _close(slow)
    await _close(fast)
    assert fast_head.startswith(b"HTTP/1.1 200 OK")
    assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert served.rejected == {"body_rate": 1}
    assert [len(r.body) for r in served.handled] == [length]
    await _settled(served)


async def test_500_slow_connections_from_one_client_leave_others_served(
        served: Served) -> None:
    await served.start(limits=HttpLimits(head_timeout=SHORT, body_rate_window=SHORT,
                                         max_connections_per_ip=20))

    async def slowloris() -> bytes:
        reader, writer = await _open(served.port, "127.0.0.2")
        try:
            with contextlib.suppress(ConnectionError):
                writer.write(b"P")
            with contextlib.suppress(ConnectionError):
                return await _read_all(reader)
            return b"reset"
        finally:
            await _close(writer)

    attack = [asyncio.ensure_future(slowloris()) for _ in range(500)]
    await asyncio.sleep(0.05)
    reader, writer = await _open(served.port)  # another client, in the thick of it
    writer.write(_get("/normal", b"Connection: close\r\n"))
    normal = await _read_all(reader)
    await _close(writer)
    answers = await asyncio.gather(*attack)
    assert normal.startswith(b"HTTP/1.1 200 OK") and normal.endswith(b"/normal 127.0.0.1 0")
    statuses = Counter(a[:12] for a in answers)
    assert set(statuses) <= {b"HTTP/1.1 408", b"HTTP/1.1 429", b"reset"}
    assert statuses[b"HTTP/1.1 429"] >= 1 and statuses[b"HTTP/1.1 408"] >= 20
    assert served.rejected["conn_limit_ip"] + served.rejected["head_timeout"] == 500
    assert [r.path for r in served.handled] == ["/normal"]
    await _settled(served)
    assert served.server is not None and served.server.ips.held == {}


# -- connection caps ------------------------------------------------------------------

async def test_connections_over_the_process_cap_are_refused_with_503(
        served: Served) -> None:
    await served.start(limits=HttpLimits(max_connections=3))
    held = [await _open(served.port) for _ in range(3)]
    await asyncio.sleep(0.05)
    reader, writer = await _open(served.port)
    raw = await _read_all(reader)
    await _close(writer)
    assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"Retry-After" in raw
    held[0][1].write(_get("/still", b"Connection: close\r\n"))
    assert (await _read_all(held[0][0])).startswith(b"HTTP/1.1 200 OK")
    for _, w in held:
        await _close(w)
    assert served.rejected == {"conn_limit_process": 1}


async def test_the_per_ip_cap_counts_the_real_client_behind_a_trusted_proxy(
        served: Served) -> None:
    await served.start(limits=HttpLimits(max_connections_per_ip=2),
                       trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))

    async def ask(client: str) -> tuple[bytes, asyncio.StreamWriter]:
        reader, writer = await _open(served.port)
        writer.write(_get("/ip", b"CF-Connecting-IP: %s\r\n" % client.encode()))
        async with asyncio.timeout(10):
            return await reader.read(65536), writer

    held = [await ask("203.0.113.9") for _ in range(2)]  # kept alive: two held
    over, w3 = await ask("203.0.113.9")
    other, w4 = await ask("2001:db8::0:1")
    assert all(r.startswith(b"HTTP/1.1 200 OK") and r.endswith(b"/ip 203.0.113.9 0")
               for r, _ in held)
    assert over.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert other.endswith(b"/ip 2001:db8::1 0")  # normalised
    for w in (w3, w4, *(w for _, w in held)):
        await _close(w)
    assert served.rejected == {"conn_limit_ip": 1}
    await _settled(served)
    assert served.server is not None and served.server.ips.held == {}


async def test_an_untrusted_peer_cannot_name_its_client_ip(served: Served) -> None:
    await served.start()
    reader, writer = await _open(served.port)
    writer.write(_get("/ip", b"CF-Connecting-IP: 203.0.113.9\r\nConnection: close\r\n"))
    raw = await _read_all(reader)
    await _close(writer)
    assert raw.endswith(b"/ip 127.0.0.1 0")


# -- head limits ----------------------------------------------------------------------

class _CountingParser(httptools.HttpRequestParser):  # type: ignore[misc]
    fed = 0

    def feed_data(self, data: bytes) -> None:
        _CountingParser.fed += len(data)
        super().feed_data(data)


@pytest.mark.parametrize(("request_bytes", "status", "reason"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431,
     "head_too_large"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"a: b\r\n" * 100_000 + b"\r\n", 431,
     "head_too_large"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(101))
     + b"\r\n", 431, "too_many_headers"),
    (b"GET /" + b"u" * 1_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "url_too_long"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"a" * 16_000_000 + b"\r\n\r\n", 431,
     "head_too_large"),
], ids=["100KB-header", "100k-headers", "101-headers", "1MB-url", "16MB-header"])
async def test_oversized_heads_are_refused_and_not_parsed_past_the_limit(
        served: Served, monkeypatch: pytest.MonkeyPatch, request_bytes: bytes, status: int,
        reason: str) -> None:
    monkeypatch.setattr(http_connection.httptools, "HttpRequestParser", _CountingParser)
    _CountingParser.fed = 0
    await served.start(limits=HttpLimits())
    reader, writer = await _open(served.port)
    reading = asyncio.ensure_future(_read_all(reader))
    with contextlib.suppress(ConnectionError):
        for i in range(0, len(request_bytes), 65536):
            writer.write(request_bytes[i:i + 65536])
            await writer.drain()
    raw = await reading
    await _close(writer)
    assert raw.startswith(b"HTTP/1.1 %d " % status) and b"Connection: close" in raw
    assert served.rejected == {reason: 1} and served.handled == []
    # Linear cost: llhttp saw no more than the limit and one read's worth, whatever the size.
    assert _CountingParser.fed <= 64 * 1024 + 256 * 1024


# -- pipelining, backpressure, buffered bodies ----------------------------------------

async def test_a_pipelining_client_that_never_reads_gets_no_more_answers_buffered(
        served: Served) -> None:
    await served.start(limits=HttpLimits(max_pipelined=100_000), keepalive_timeout=30.0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    n = 1000  # 1,000 answers of 50 kB: 50 MB if they were all buffered (the kernel's
    # socket buffers on loopback take a few MB, a hundred answers at the very most)
    writer.write(_get("/big") * n)
    await writer.drain()
    assert served.server is not None
    for _ in range(50):  # let the server do all it will
        await asyncio.sleep(0.02)
    (conn,) = served.server.connections
    assert conn.transport is not None
    buffered = conn.transport.get_write_buffer_size()
    answered = len(served.handled)
    assert answered < n // 4 and buffered < 200_000
    got = 0
    async with asyncio.timeout(30):  # the client reads: everything is answered, in order
        while got < n:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(len(BIG))
            got += 1
    await _close(writer)
    assert len(served.handled) == n and served.rejected == {}


async def test_pipelining_past_the_limit_answers_the_queued_then_429(served: Served) -> None:
    await served.start(limits=HttpLimits(max_pipelined=4))
    reader, writer = await _open(served.port)
    writer.write(b"".join(_get(f"/{i}") for i in range(20)))
    raw = await _read_all(reader)
    await _close(writer)
    answers = raw.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200"] * (len(answers) - 1) + [b"429"]
    assert 1 < len(answers) < 20 and served.rejected == {"pipeline_limit": 1}
    assert [r.path for r in served.handled] == [f"/{i}" for i in range(len(answers) - 1)]


async def test_bodies_being_read_are_bounded_per_process(served: Served) -> None:
    await served.start(limits=HttpLimits(max_buffered_body=100_000, head_timeout=10,
                                         body_rate_window=10))
    head = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 80000\r\n\r\n"
    r1, w1 = await _open(served.port)
    w1.write(head + b"a" * 70_000)
    await w1.drain()
    assert served.server is not None
    async with asyncio.timeout(10):
        while served.server.buffered_body < 70_000:
            await asyncio.sleep(0.01)
    r2, w2 = await _open(served.port)
    w2.write(head + b"b" * 70_000)
    second = await _read_all(r2)
    assert second.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    w1.write(b"a" * 10_000)  # the first still completes
    first = await r1.readuntil(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK")
    await _close(w1)
    await _close(w2)
    assert served.rejected == {"body_buffer_full": 1}
    await _settled(served)

