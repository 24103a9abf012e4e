"""A request's key is checked once its head is in, before any of its body is read.

What a client (or an attacker) would notice: an unauthenticated client that announces a
large body is answered 401 at once and never gets ``100 Continue``, so it cannot make
the proxy read and buffer megabytes first; a good key still gets ``100 Continue`` and
its answer; every refusal still leaves exactly one event.
"""

from __future__ import annotations

import asyncio

import orjson

from shared import apikeys
from tests.proxy.conftest import Gateway

_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
         b"Content-Type: application/json\r\n")
_BODY = orjson.dumps({"model": "demo-mini", "messages": [{"role": "user", "content": "Hi"}]})


async def _open(gateway: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gateway.base_url.split("//")[1].split("/")[0].split(":")
    return await asyncio.open_connection(host, int(port))


async def _head(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):  # hang guard: a proxy waiting for the body never answers
        return await reader.readuntil(b"\r\n\r\n")


async def test_a_bad_key_is_refused_before_its_announced_body_is_read(
    gateway: Gateway, api_key: str  # a published key: Redis is filled, unknown is 401
) -> None:
    unknown, _ = apikeys.generate()  # well formed, never published
    for key in ("qnp_garbage", unknown):
        reader, writer = await _open(gateway)
        # 8 MB announced and never sent: only an answer from the head alone arrives.
        writer.write(_HEAD + f"Authorization: Bearer {key}\r\n".encode()
                     + b"Content-Length: 8000000\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        head = await _head(reader)
        writer.close()
        await writer.wait_closed()
        assert head.startswith(b"HTTP/1.1 401"), head
        assert b"100 Continue" not in head
        assert b"connection: close" in head.lower()  # the unread body is never framed
    events = await gateway.events(2)
    assert [(e.status, e.outcome) for e in events] == [(401, "unauthorized")] * 2


async def test_a_good_key_gets_100_continue_then_its_answer(
    gateway: Gateway, api_key: str
) -> None:
    reader, writer = await _open(gateway)
    writer.write(_HEAD + f"Authorization: Bearer {api_key}\r\n".encode()
                 + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(_BODY))
    await writer.drain()
    assert (await _head(reader)).startswith(b"HTTP/1.1 100 Continue")
    writer.write(_BODY)
    await writer.drain()
    head = await _head(reader)
    writer.close()
    await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 200"), head
    [event] = await gateway.events(1)
    assert (event.status, event.outcome) == (200, "ok")


async def test_a_first_time_key_is_verified_from_the_head_and_then_served_from_cache(
    gateway: Gateway, api_key: str
) -> None:
    # The first request needs Redis and bcrypt (the check is awaited while its body
    # waits unread); the second is a cache hit. Both are answered in full.
    for _ in range(2):
        reader, writer = await _open(gateway)
        writer.write(_HEAD + f"Authorization: Bearer {api_key}\r\n".encode()
                     + b"Content-Length: %d\r\n\r\n" % len(_BODY) + _BODY)
        await writer.drain()
        head = await _head(reader)
        writer.close()
        await writer.wait_closed()
        assert head.startswith(b"HTTP/1.1 200"), head
    events = await gateway.events(2)
    assert [e.status for e in events] == [200, 200]
