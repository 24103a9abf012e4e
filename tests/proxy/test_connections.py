"""The proxy's upstream HTTP/1.1 client against a raw server we script byte by byte.

What a user would notice: a second request paying a new connection (latency), a
compressed body relayed to a client that did not ask for it, a body cut short or a
broken upstream reported as success, an abandoned stream whose connection is reused
(the next request would read the old one's bytes).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.connections import ConnectionPool, UpstreamIOError

Answer = Callable[[bytes], bytes]  # request bytes -> response bytes


@dataclass
class Upstream:
    url: str = ""
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    answer: Answer = lambda _req: b""
    close_after: bool = False


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream(answer=lambda _req: _ok(b'{"ok":true}'))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                request = head + await reader.readexactly(length)
                up.requests.append(request)
                writer.write(up.answer(request))
                await writer.drain()
                if up.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    up.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    async with server:
        yield up
        server.close()


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(connect_timeout=2.0, read_timeout=2.0)
    yield p
    p.close()


def _soon(seconds: float = 5.0) -> float:
    """A deadline in loop time."""
    return asyncio.get_running_loop().time() + seconds


async def _post(pool: ConnectionPool, url: str) -> tuple[int, bytes]:
    resp = await pool.post(url, {"Content-Type": "application/json"}, b'{"model":"m"}',
                           _soon())
    body = await resp.read()
    resp.release()
    return resp.status, body


async def test_sequential_requests_reuse_one_keepalive_connection(
        upstream: Upstream, pool: ConnectionPool) -> None:
    for _ in range(3):
        assert await _post(pool, upstream.url) == (200, b'{"ok":true}')
    assert upstream.connections == 1
    request = upstream.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    # Bytes are relayed and scanned as sent: the upstream must not compress them.
    assert b"\r\nAccept-Encoding: identity\r\n" in request
    assert request.endswith(b'\r\n\r\n{"model":"m"}')


async def test_chunked_and_close_delimited_bodies_arrive_whole(
        upstream: Upstream, pool: ConnectionPool) -> None:
    upstream.answer = lambda _req: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"6\r\ndata: \r\n4\r\nabc\n\r\n0\r\n\r\n")
    assert await _post(pool, upstream.url) == (200, b"data: abc\n")
    upstream.close_after = True
    upstream.answer = lambda _req: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
    assert await _post(pool, upstream.url) == (200, b"until the end")


async def test_a_body_cut_short_is_an_error_not_a_short_success(
        upstream: Upstream, pool: ConnectionPool) -> None:
    upstream.close_after = True
    upstream.answer = lambda _req: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"
    resp = await pool.post(upstream.url, {}, b"{}", _soon())
    with pytest.raises(UpstreamIOError):
        await resp.read()
    resp.close()


async def test_garbage_instead_of_http_fails_the_request(
        upstream: Upstream, pool: ConnectionPool) -> None:
    upstream.answer = lambda _req: b"SSH-2.0-OpenSSH_9.2\r\n\r\n"
    with pytest.raises(UpstreamIOError):
        await pool.post(upstream.url, {}, b"{}", _soon())


async def test_an_abandoned_response_closes_its_connection(
        upstream: Upstream, pool: ConnectionPool) -> None:
    upstream.answer = lambda _req: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"5\r\nfirst\r\n")  # and then nothing more
    resp = await pool.post(upstream.url, {}, b"{}", _soon())
    assert await resp.readany() == b"first"
    resp.close()  # the client left mid-stream
    upstream.answer = lambda _req: _ok(b"fresh")
    # A reused connection would hand the next request the old stream's leftovers.
    assert await _post(pool, upstream.url) == (200, b"fresh")
    assert upstream.connections == 2


async def test_a_pooled_connection_the_upstream_closed_is_not_reused(
        upstream: Upstream, pool: ConnectionPool) -> None:
    upstream.close_after = True  # answers keep-alive but hangs up after each response
    assert await _post(pool, upstream.url) == (200, b'{"ok":true}')
    await asyncio.sleep(0.05)  # the close reaches us
    assert await _post(pool, upstream.url) == (200, b'{"ok":true}')
    assert upstream.connections == 2


async def test_silence_mid_body_times_out(upstream: Upstream) -> None:
    pool = ConnectionPool(connect_timeout=2.0, read_timeout=0.2)
    upstream.answer = lambda _req: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"
    try:
        resp = await pool.post(upstream.url, {}, b"{}", _soon())
        with pytest.raises(TimeoutError):
            await resp.read()
        resp.close()
    finally:
        pool.close()


async def test_no_headers_by_the_deadline_is_a_timeout(
        upstream: Upstream, pool: ConnectionPool) -> None:
    upstream.answer = lambda _req: b""  # reads the request, never answers
    with pytest.raises(TimeoutError):
        await pool.post(upstream.url, {}, b"{}", _soon(0.2))
    upstream.answer = lambda _req: _ok(b"next")
    # The timed-out connection is not reused: its late answer would go to the next one.
    assert await _post(pool, upstream.url) == (200, b"next")
    assert upstream.connections == 2


async def test_a_slow_steady_body_outlives_the_read_timeout() -> None:
    """The read timeout is for silence, not for the whole body: bytes every 0.1 s for
    about 0.8 s against a 0.25 s read timeout must all arrive."""
    pool = ConnectionPool(connect_timeout=2.0, read_timeout=0.25)
    server = await asyncio.start_server(_trickle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    try:
        async with server:
            resp = await pool.post(url, {}, b"{}", _soon())
            assert await resp.read() == b"x" * 8
            resp.release()
    finally:
        pool.close()


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n{}")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n")
    for _ in range(8):
        await asyncio.sleep(0.1)
        writer.write(b"x")
        await writer.drain()
    writer.close()


async def test_a_host_name_is_resolved_once_and_its_addresses_tried_in_turn(
        upstream: Upstream, pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    real = loop.getaddrinfo

    async def counting(host: str, *args: Any, **kw: Any) -> Any:
        lookups.append(host)
        # An address nothing listens on first: the pool must go on to the next one.
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", 1)),
                *await real("127.0.0.1", *args, **kw)]

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    url = upstream.url.replace("127.0.0.1", "upstream.test")
    upstream.close_after = True  # every request needs a new connection
    for _ in range(3):
        assert await _post(pool, url) == (200, b'{"ok":true}')
        await asyncio.sleep(0.05)  # the close reaches us
    assert lookups == ["upstream.test"]
    assert upstream.connections == 3
    assert b"\r\nHost: upstream.test:" in upstream.requests[0]
