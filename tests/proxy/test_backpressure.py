"""Backpressure on a real proxy process: a hundred clients that read a few KB of a large
stream and then stop reading must not make the proxy buffer those streams.

The upstream here streams ~18 MB per request as fast as the proxy takes it, built
lazily from one prebuilt chunk so that the test process itself stays small. Each client
is a raw socket with a small receive buffer that reads a few KB and then parks. If the
proxy kept reading from the upstream while its client was not reading, it would pull
each whole stream through its memory; with backpressure it holds no more than its read
and write buffers per stream, and the upstream itself is held back. (Loopback's kernel
socket buffers absorb several MB per connection, which is why the streams are large.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from shared.redis_names import RedisNames
from tests.proxy.conftest import proxy_env, publish_key, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

READERS = 100
_PIECE = "x" * 1_000
_CHUNK = b"data: " + orjson.dumps({
    "id": "chatcmpl-big", "object": "chat.completion.chunk", "created": 0,
    "model": "demo-mini-2024",
    "choices": [{"index": 0, "delta": {"content": _PIECE}, "finish_reason": None}],
}) + b"\n\n"


def _kernel_absorbs() -> int:
    """The most one stream's bytes the kernel may hold on the way without the proxy
    reading: the proxy's receive buffer from the upstream (autotuned up to tcp_rmem's
    maximum: 32 MB on some machines) and its send buffer to the client (up to
    tcp_wmem's). A stream smaller than that can reach its end with no backpressure at
    all, which once made this test fail on such a machine (18 MB streams)."""
    def most(name: str) -> int:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])
    return most("tcp_rmem") + most("tcp_wmem")


# Per stream: beyond every kernel buffer on the way (and the proxy's own 64 KiB), so
# only backpressure can keep a parked stream from running to its end. The upstream
# writes lazily, so a large stream costs only what is really absorbed.
CHUNKS = (_kernel_absorbs() + 8 * 1024 * 1024) // len(_CHUNK) + 1
STREAM_BYTES = CHUNKS * len(_CHUNK)
_TAIL = b"data: " + orjson.dumps({
    "id": "chatcmpl-big", "object": "chat.completion.chunk", "created": 0,
    "model": "demo-mini-2024", "choices": [],
    "usage": {"prompt_tokens": 10, "completion_tokens": CHUNKS, "total_tokens": CHUNKS + 10},
}) + b"\n\ndata: [DONE]\n\n"
MB = 1024 * 1024


@dataclass
class BigUpstream:
    """An OpenAI-format upstream whose every stream is ``CHUNKS`` large chunks, no delay;
    ``sent`` is how many bytes each stream has handed to its socket so far."""

    base_url: str = ""
    sent: list[int] = field(default_factory=list)
    open_streams: int = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        slot = len(self.sent)
        self.sent.append(0)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        transport = request.transport
        assert transport is not None  # a small send buffer: less kernel memory in the way
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                      64 * 1024)
        self.open_streams += 1
        try:
            await response.prepare(request)
            for _ in range(CHUNKS):
                await response.write(_CHUNK)  # waits while the proxy is not reading
                self.sent[slot] += len(_CHUNK)
            await response.write(_TAIL)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the proxy closed it: its client left
        finally:
            self.open_streams -= 1
        return response


@pytest.fixture
async def big_upstream() -> AsyncIterator[BigUpstream]:
    upstream = BigUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.chat)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0,
                           handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield upstream
    finally:
        await runner.cleanup()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def _open_reader(port: int, key: str, read: int) -> socket.socket:
    """A client that sends a streamed request, reads ``read`` bytes of the answer
    (headers included) and then stops reading; its small receive buffer means the
    proxy's writes to it stall soon after."""
    loop = asyncio.get_running_loop()
    body = orjson.dumps({"model": "demo-mini", "stream": True,
                         "messages": [{"role": "user", "content": "Everything, please."}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, head + body)
        got = b""
        while len(got) < read:
            data = await loop.sock_recv(sock, 4096)
            assert data, f"the proxy closed the stream early: {got[:300]!r}"
            got += data
        assert got.startswith(b"HTTP/1.1 200"), got[:300]
        return sock
    except BaseException:
        sock.close()
        raise


async def _until(condition: object, deadline: float, what: str) -> None:
    """A hang guard: poll ``condition`` until true or ``deadline`` seconds passed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition():  # type: ignore[operator]
        assert loop.time() < end, f"{what} within {deadline} s"
        await asyncio.sleep(0.05)


async def test_slow_readers_of_large_streams_keep_the_proxy_bounded_in_memory(
    tmp_path: Path, redis_url: str, redis_names: RedisNames, redis: aioredis.Redis,
    big_upstream: BigUpstream,
) -> None:
    port = free_port()
    env = proxy_env(redis_url, redis_names, write_catalog(tmp_path, big_upstream.base_url),
                    QNP_PROXY_PORT=str(port), QNP_WORKERS="1", QNP_LOG_LEVEL="WARNING")
    key, _ = await publish_key(redis, redis_names)
    sockets: list[socket.socket] = []
    with ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env) as proxy:
        try:
            await wait_for_http(f"http://127.0.0.1:{port}/readyz", expect_status=200)
            # Warm up every code path (imports, pools, first-use caches) with a few
            # parked readers, then let them go, so the baseline is the steady state.
            async with asyncio.timeout(20):  # hang guard
                warm = [await _open_reader(port, key, 8192) for _ in range(3)]
            for sock in warm:
                sock.close()
            await _until(lambda: big_upstream.open_streams == 0, 10,
                         "the warm-up streams' upstreams were not closed")
            before = _rss_bytes(proxy.pid)

            async with asyncio.timeout(30):  # hang guard
                sockets += await asyncio.gather(
                    *(_open_reader(port, key, 8192) for _ in range(READERS)))
            # Parked: wait until nothing moves any more (every buffer on the way full).
            last = -1
            while (total := sum(big_upstream.sent)) != last:
                last = total
                await asyncio.sleep(0.5)
                assert len(big_upstream.sent) == READERS + 3
            during = _rss_bytes(proxy.pid)
            parked = big_upstream.sent[3:]
        finally:
            for sock in sockets:
                sock.close()
        # Readers gone: the proxy closes every upstream stream it was relaying.
        await _until(lambda: big_upstream.open_streams == 0, 10,
                     "upstream streams still open after their clients left")
        assert proxy.stop() == 0, proxy.log_text()

    growth = during - before
    print(f"\nproxy VmRSS before {before / MB:.1f} MB, with {READERS} parked readers "
          f"{during / MB:.1f} MB: growth {growth / MB:.1f} MB "
          f"({growth / READERS / 1024:.0f} KB per stream); upstream sent per stream "
          f"max {max(parked) / 1024:.0f} KB of {STREAM_BYTES / 1024:.0f} KB")
    assert growth < READERS * MB, f"proxy grew {growth / MB:.1f} MB for {READERS} streams"
    # The slow clients held the upstream back: no stream ran to its end.
    assert max(parked) < STREAM_BYTES
    assert "Traceback" not in proxy.log_text()
