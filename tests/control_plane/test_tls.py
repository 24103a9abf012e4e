"""The control plane in transit over TLS: its admin listener (and the web listener's
context) serving TLS 1.2+, Redis over ``rediss://`` with mutual TLS, and PostgreSQL
with ``sslmode=verify-full``. Real TLS servers (``tests.tls_servers``) and a CA the
tests make (``tests.tls_certs``)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError

from control_plane import service
from control_plane.connections import open_pool, open_redis
from control_plane.migrate import migrate
from control_plane.settings import Settings, SettingsError
from control_plane.tls import TlsError, listener_context
from devstack.servers import RunningServer
from shared.redis_names import RedisNames
from tests.control_plane.factories import ADMIN_TOKEN, make_settings
from tests.support import free_port
from tests.tls_certs import Pki, make_pki
from tests.tls_servers import start_tls_postgres, start_tls_redis

REFUSED = (ssl.SSLError, ConnectionResetError, aiohttp.ClientConnectorError)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_redis(pki: Pki) -> Iterator[RunningServer]:
    with start_tls_redis(pki) as srv:
        yield srv


@pytest.fixture(scope="module")
def tls_postgres(pki: Pki) -> Iterator[RunningServer]:
    with start_tls_postgres(pki) as srv:
        yield srv


def verify_full(url: str, ca: Path) -> str:
    return f"{url}?sslmode=verify-full&sslrootcert={quote(str(ca))}"


def tls_env(pki: Pki) -> dict[str, str]:
    return {"QNP_REDIS_TLS_CA": str(pki.ca), "QNP_REDIS_TLS_CERT": str(pki.client_cert),
            "QNP_REDIS_TLS_KEY": str(pki.client_key)}


def _client(pki: Pki, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: what we test is its refusal
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so the refusal is the server's
    return context


async def _get(url: str, context: ssl.SSLContext) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as reply:
        return reply.status, await reply.json()


@contextlib.asynccontextmanager
async def _serving(settings: Settings) -> AsyncIterator[None]:
    """``service.serve`` (admin API, ingest, maintenance) until the test is done."""
    task = asyncio.create_task(service.serve(settings))
    try:
        for _ in range(400):
            await asyncio.sleep(0.025)
            if task.done():
                task.result()  # start-up failed: raise its error
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(settings.admin_host,
                                                          settings.admin_port)
                writer.close()
                break
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def test_serve_over_tls_end_to_end(
    tmp_path: Path, pki: Pki, tls_redis: RunningServer, tls_postgres: RunningServer,
) -> None:
    """Admin listener on https, Postgres verify-full, Redis over mutual TLS: the
    admin API's health check reaches both stores, and TLS 1.1 is refused."""
    dsn = verify_full(tls_postgres.url, pki.ca)
    await migrate(dsn)
    port, web_port = free_port(), free_port()
    settings = make_settings(dsn, tls_redis.url, RedisNames("qnptlscp"), **tls_env(pki),
                             QNP_ADMIN_PORT=str(port), QNP_ADMIN_TLS_CERT=str(pki.cert),
                             QNP_ADMIN_TLS_KEY=str(pki.key), QNP_WEB_PORT=str(web_port),
                             QNP_WEB_TLS_CERT=str(pki.cert), QNP_WEB_TLS_KEY=str(pki.key))
    async with _serving(settings):
        url = f"https://localhost:{port}/healthz"
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            status, body = await _get(url, _client(pki, version))
            assert (status, body) == (200, {"status": "ok", "postgres": True, "redis": True})
        with pytest.raises(REFUSED):
            await _get(url, _client(pki, ssl.TLSVersion.TLSv1_1))
        # The public web role's listener serves TLS the same way.
        web_url = f"https://localhost:{web_port}/healthz"
        status, _ = await _get(web_url, _client(pki, ssl.TLSVersion.TLSv1_2))
        assert status == 200
        with pytest.raises(REFUSED):
            await _get(web_url, _client(pki, ssl.TLSVersion.TLSv1_1))
        async with aiohttp.ClientSession() as session, session.get(
                f"https://localhost:{port}/v1/accounts/x/balance", ssl=_client(
                    pki, ssl.TLSVersion.TLSv1_3),
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as reply:
            assert reply.status in (400, 404)  # the API answers, over TLS


async def test_the_web_listeners_context_serves_tls_1_2_and_up(pki: Pki) -> None:
    """What the web role's listener is given (``listener_context(settings.tls.web)``)."""
    settings = Settings.from_env({"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x",
                                  "QNP_WEB_TLS_CERT": str(pki.cert),
                                  "QNP_WEB_TLS_KEY": str(pki.key)})
    context = listener_context(settings.tls.web)
    assert context is not None
    assert listener_context(settings.tls.admin) is None  # not given: plain HTTP

    async def hello(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    try:
        assert await _get(f"https://localhost:{port}/", _client(pki, ssl.TLSVersion.TLSv1_2)) \
            == (200, {"status": "ok"})
        with pytest.raises(REFUSED):
            await _get(f"https://localhost:{port}/", _client(pki, ssl.TLSVersion.TLSv1_1))
    finally:
        await runner.cleanup()


async def test_redis_with_an_unknown_ca_is_refused(pki: Pki, tls_redis: RunningServer) -> None:
    env = {**tls_env(pki), "QNP_REDIS_TLS_CA": str(pki.other_ca)}
    client = open_redis(make_settings("postgresql://x/y", tls_redis.url, RedisNames("t"), **env))
    try:
        with pytest.raises(RedisConnectionError):
            await client.ping()
    finally:
        await client.aclose()


async def test_postgres_verify_full_checks_the_server_name(
    tmp_path: Path, tls_postgres: RunningServer,
) -> None:
    """verify-full refuses a certificate the right CA signed for another host, and one
    signed by a CA we do not trust; verify-ca (no name check) shows the first is the
    name's fault alone."""
    elsewhere = make_pki(tmp_path / "other", names=("db.example.internal",), ips=())
    with start_tls_postgres(elsewhere) as srv:
        with pytest.raises(ssl.SSLCertVerificationError, match="(?i)hostname|IP address"):
            await asyncpg.connect(verify_full(srv.url, elsewhere.ca))
        conn = await asyncpg.connect(verify_full(srv.url, elsewhere.ca)
                                     .replace("verify-full", "verify-ca"))
        await conn.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncpg.connect(verify_full(srv.url, elsewhere.other_ca))


async def test_the_pool_connects_with_tls(pki: Pki, tls_postgres: RunningServer) -> None:
    settings = make_settings(verify_full(tls_postgres.url, pki.ca), "redis://x",
                             RedisNames("t"))
    pool = await open_pool(settings, min_size=1, max_size=2)
    try:
        row = await pool.fetchrow(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await pool.close()
    assert row is not None and row["ssl"] is True
    assert row["version"] in ("TLSv1.2", "TLSv1.3")


def test_tls_settings_go_in_pairs_and_name_readable_files(tmp_path: Path, pki: Pki) -> None:
    base = {"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x"}
    with pytest.raises(SettingsError, match="QNP_WEB_TLS_KEY"):
        Settings.from_env({**base, "QNP_WEB_TLS_CERT": str(pki.cert)})
    with pytest.raises(SettingsError, match="QNP_ADMIN_TLS_CERT"):
        Settings.from_env({**base, "QNP_ADMIN_TLS_CERT": str(tmp_path / "none.pem"),
                           "QNP_ADMIN_TLS_KEY": str(pki.key)})
    with pytest.raises(SettingsError, match="QNP_REDIS_TLS_CERT"):
        Settings.from_env({**base, "QNP_REDIS_TLS_KEY": str(pki.client_key)})
    tls = Settings.from_env({**base, **tls_env(pki)}).tls
    assert (tls.redis_ca, tls.redis_cert, tls.redis_key) == (pki.ca, pki.client_cert,
                                                             pki.client_key)


def test_a_key_that_does_not_match_is_an_error_naming_the_file(pki: Pki) -> None:
    settings = Settings.from_env({"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x",
                                  "QNP_ADMIN_TLS_CERT": str(pki.cert),
                                  "QNP_ADMIN_TLS_KEY": str(pki.client_key)})
    with pytest.raises(TlsError, match=str(pki.cert)):
        listener_context(settings.tls.admin)
