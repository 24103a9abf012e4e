"""The proxy on a Redis that speaks TLS only (``rediss://``), on both of its client paths:
redis-py's commands and the fast RESP pipe (``proxy.resp``) that admission runs on.
The server is a real Redis with TLS (``tests.tls_servers``) that wants client
certificates, as Redis does by default; certificates come from ``tests.tls_certs``."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest
import redis.asyncio as aioredis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError

from devstack.servers import RunningServer
from devstack.upstream_openai import MockOpenAIUpstream
from proxy import resp, server
from proxy.app import ADMISSION, REDIS, WATCHING, connect_redis
from proxy.settings import load
from proxy.tls import RedisTls
from shared.redis_names import RedisNames
from tests.proxy.conftest import proxy_env, publish_key, write_catalog
from tests.tls_certs import Pki, make_pki
from tests.tls_servers import start_tls_redis

PING = resp.command("PING")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_redis(pki: Pki) -> Iterator[RunningServer]:
    with start_tls_redis(pki) as srv:
        yield srv


def _trust(pki: Pki, ca: Path | None = None) -> RedisTls:
    return RedisTls(ca or pki.ca, pki.client_cert, pki.client_key)


@pytest.fixture
async def client(tls_redis: RunningServer, pki: Pki) -> AsyncIterator[aioredis.Redis]:
    c = connect_redis(tls_redis.url, tls=_trust(pki))
    yield c
    await c.aclose()


def _pipe_protocol(pipe: resp.Pipe) -> str:
    """The TLS version of the socket the pipe writes to."""
    link = pipe._link
    assert link is not None
    ssl_object = link._transport.get_extra_info("ssl_object")
    assert isinstance(ssl_object, ssl.SSLObject)
    return str(ssl_object.version())


async def test_the_fast_pipe_runs_over_tls(client: aioredis.Redis) -> None:
    pipe = resp.Pipe.of(client)
    assert pipe is not None, "a rediss:// client must keep the fast RESP path"
    assert await client.ping() is True  # redis-py's own path
    assert await pipe.call(PING) == b"PONG"
    assert await pipe.call_many([resp.command("SET", "qnptls:k", "v"),
                                 resp.command("GET", "qnptls:k")]) == [b"OK", b"v"]
    assert _pipe_protocol(pipe) in ("TLSv1.2", "TLSv1.3")
    await pipe.close()


def test_the_fast_pipe_runs_over_tls_on_uvloop(tls_redis: RunningServer, pki: Pki) -> None:
    """As in production: uvloop's own TLS transport hands the pipe its bytes too."""

    async def main() -> tuple[object, str]:
        c = connect_redis(tls_redis.url, tls=_trust(pki))
        try:
            pipe = resp.Pipe.of(c)
            assert pipe is not None
            replies = await pipe.call_many([resp.command("SET", "qnptls:uv", "1"),
                                            resp.command("INCR", "qnptls:uv"), PING])
            return replies, _pipe_protocol(pipe)
        finally:
            await c.aclose()

    replies, protocol = uvloop.run(main())
    assert replies == [b"OK", 2, b"PONG"]
    assert protocol in ("TLSv1.2", "TLSv1.3")


async def test_the_server_speaks_nothing_but_tls(tls_redis: RunningServer) -> None:
    plain = aioredis.Redis.from_url(tls_redis.url.replace("rediss://", "redis://"),
                                    socket_timeout=2, socket_connect_timeout=2)
    with pytest.raises(RedisConnectionError):
        await plain.ping()
    await plain.aclose()


@pytest.mark.parametrize("what", ["unknown CA", "no client certificate"])
async def test_both_paths_refuse_what_fails_verification(
    tls_redis: RunningServer, pki: Pki, what: str,
) -> None:
    tls = _trust(pki, pki.other_ca) if what == "unknown CA" else RedisTls(pki.ca)
    c = connect_redis(tls_redis.url, tls=tls)
    try:
        with pytest.raises(RedisConnectionError):
            await c.ping()
        pipe = resp.Pipe.of(c)
        assert pipe is not None
        with pytest.raises(RedisConnectionError):
            await pipe.call(PING)
    finally:
        await c.aclose()


async def test_a_certificate_for_another_host_name_is_refused(tmp_path: Path) -> None:
    """Host names are checked too, on the fast path as on redis-py's."""
    elsewhere = make_pki(tmp_path / "pki", names=("redis.example.internal",), ips=())
    with start_tls_redis(elsewhere) as srv:
        c = connect_redis(srv.url, tls=RedisTls(elsewhere.ca, elsewhere.client_cert,
                                                elsewhere.client_key))
        try:
            with pytest.raises(RedisConnectionError, match="(?i)hostname|IP address"):
                await c.ping()
            pipe = resp.Pipe.of(c)
            assert pipe is not None
            with pytest.raises(RedisConnectionError, match="(?i)hostname|IP address"):
                await pipe.call(PING)
        finally:
            await c.aclose()


async def test_the_proxy_admits_and_records_over_rediss(
    tmp_path: Path, tls_redis: RunningServer, pki: Pki, client: aioredis.Redis,
    mock_upstream: MockOpenAIUpstream,
) -> None:
    names = RedisNames("qnptlsproxy")
    catalog = write_catalog(tmp_path, mock_upstream.base_url)
    settings = load(proxy_env(tls_redis.url, names, catalog, QNP_REDIS_TLS_CA=str(pki.ca),
                              QNP_REDIS_TLS_CERT=str(pki.client_cert),
                              QNP_REDIS_TLS_KEY=str(pki.client_key)))
    key, _ = await publish_key(client, names, limits={"rpm": 100})
    running = await server.start(settings)
    try:
        await running.app[WATCHING].wait()
        pipe = running.app[ADMISSION]._pipe
        assert pipe is not None, "admission fell back to redis-py on rediss://"
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{running.port}/v1",
                                      api_key=key, max_retries=0) as api:
            reply = await api.chat.completions.create(
                model="demo-mini", messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content
        assert _pipe_protocol(pipe) in ("TLSv1.2", "TLSv1.3")
        emitted = running.app[REDIS]
        for _ in range(500):
            if await emitted.xlen(names.events) >= 1:
                break
            await asyncio.sleep(0.01)
        assert await client.xlen(names.events) == 1
    finally:
        await running.stop(1.0)
        keys = [k async for k in client.scan_iter(match=f"{names.prefix}*")]
        if keys:
            await client.unlink(*keys)
