"""The web listener's edge limits: a connection that trickles its head (or says
nothing) is closed at the head deadline while others are served; oversized heads are
refused; a body that is too slow gets 408 and never reaches a handler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from control_plane.roles import Listener
from control_plane.runtime import open_stores
from control_plane.settings import Settings
from control_plane.web import edge
from control_plane.web.app import make_web_app
from control_plane.web.edge import HEADS, SERVER_LIMITS, HeadDeadline
from shared.redis_names import RedisNames
from tests.control_plane.web.conftest import web_settings
from tests.support import free_port

DEADLINE_S = 0.5
HANG_GUARD_S = 10.0


@pytest.fixture
async def listener(migrated_url: str, redis_url: str, redis_names: RedisNames
                   ) -> AsyncIterator[tuple[int, HeadDeadline]]:
    port = free_port()
    settings: Settings = web_settings(migrated_url, redis_url, redis_names, port, [])
    async with open_stores(settings) as stores:
        app = make_web_app(settings, stores)
        heads = app[HEADS] = HeadDeadline(DEADLINE_S)
        role = Listener("web", app, "127.0.0.1", port, 1.0, **SERVER_LIMITS)
        await role.start()
        try:
            yield port, heads
        finally:
            await role.stop(1.0)


async def _healthz(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), HANG_GUARD_S)
    writer.close()
    return data


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), HANG_GUARD_S) == b""
    except ConnectionResetError:
        return True


async def test_a_trickled_head_is_closed_and_others_are_served(
    listener: tuple[int, HeadDeadline]
) -> None:
    port, heads = listener
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")

    async def trickle() -> None:
        for _ in range(int(HANG_GUARD_S / 0.1)):  # one header byte every 0.1 s
            if writer.is_closing():
                return
            writer.write(b"X")
            await asyncio.sleep(0.1)

    trickling = asyncio.create_task(trickle())
    assert (await _healthz(port)).startswith(b"HTTP/1.1 200")  # served meanwhile
    assert await _closed(reader)
    trickling.cancel()
    writer.close()
    assert heads.closed == 1


async def test_an_idle_connection_is_closed_and_a_busy_one_is_not(
    listener: tuple[int, HeadDeadline]
) -> None:
    port, heads = listener
    idle_reader, idle = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(3):  # keep-alive requests, each well inside the deadline
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"}")).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(DEADLINE_S / 3)
    assert await _closed(idle_reader)
    idle.close()
    writer.close()
    assert heads.closed >= 1


@pytest.mark.parametrize("head", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100)) + b"\r\n",
])
async def test_oversized_heads_are_refused(listener: tuple[int, HeadDeadline],
                                           head: bytes) -> None:
    port, _ = listener
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    data = await asyncio.wait_for(reader.read(), HANG_GUARD_S)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    assert status in (400, 413, 414, 431), data[:200]


async def test_a_slow_body_gets_408_before_any_handler(
    listener: tuple[int, HeadDeadline], monkeypatch: Any
) -> None:
    port, _ = listener
    monkeypatch.setattr(edge, "BODY_DEADLINE_S", DEADLINE_S)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /api/v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 b"qnp_notakey\r\nContent-Length: 100\r\n\r\n{")
    data = await asyncio.wait_for(reader.read(), HANG_GUARD_S)
    writer.close()
    assert data.startswith(b"HTTP/1.1 401")  # refused at the key, before the body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /signup HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                 b"Origin: http://127.0.0.1:%d\r\nCookie: __Host-qnp_signup=x\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\n\r\ncsrf" % port)
    data = await asyncio.wait_for(reader.read(1024), HANG_GUARD_S)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
