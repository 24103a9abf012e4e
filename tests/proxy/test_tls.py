"""The proxy serving TLS itself (``--tls-cert``/``--tls-key``), as Cloudflare's Full
(strict) mode needs: TLS 1.2 and 1.3 served, older protocols and weak suites refused,
the OpenAI SDK working through https with streaming, and bad configuration refused at
start-up. Certificates come from a CA each test session makes (``tests.tls_certs``)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis.asyncio as aioredis

from devstack.upstream_openai import MockOpenAIUpstream
from proxy import server
from proxy.__main__ import main as proxy_main
from proxy.settings import SettingsError, load
from proxy.tls import TlsError
from shared.redis_names import RedisNames
from tests.proxy.conftest import Gateway, GatewayFactory, proxy_env, publish_key, write_catalog
from tests.support import ModuleProcess, free_port
from tests.tls_certs import Pki, make_pki

MESSAGES = [{"role": "user", "content": "Say hello."}]
# A refused handshake: an alert (SSLError), or the socket reset before the client reads it.
REFUSED = (ssl.SSLError, ConnectionResetError)
_HEALTH = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def tls_gateway(start_gateway: GatewayFactory, pki: Pki) -> Gateway:
    gw: Gateway = await start_gateway(QNP_TLS_CERT=str(pki.cert), QNP_TLS_KEY=str(pki.key))
    gw.base_url = gw.base_url.replace("http://", "https://")
    return gw


def _client(pki: Pki, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLContext:
    """A client that speaks exactly ``version`` (and only ``ciphers``, if given)."""
    context = ssl.create_default_context(cafile=pki.ca)
    with warnings.catch_warnings():  # Python deprecates TLS 1.0/1.1: what we test is refusal
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3 refuses TLS 1.0/1.1 at its default security level on its own: lower
        # it, so that what refuses this client is the server's policy and not ours.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if ciphers is not None:
        context.set_ciphers(ciphers)
    return context


async def _health(port: int, context: ssl.SSLContext) -> tuple[str, bytes]:
    """(negotiated protocol, response) of GET /healthz over TLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="localhost")
    try:
        version = writer.get_extra_info("ssl_object").version()
        writer.write(_HEALTH)
        return version, await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def _lenient_server(pki: Pki) -> AsyncIterator[int]:
    """A TLS server that accepts anything OpenSSL can still speak: the control showing
    that a client our proxy refuses can connect at all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.load_cert_chain(pki.cert, pki.key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()

    srv = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    try:
        yield int(srv.sockets[0].getsockname()[1])
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_1_2_and_1_3_are_served(tls_gateway: Gateway, pki: Pki,
                                          version: ssl.TLSVersion) -> None:
    negotiated, response = await _health(tls_gateway.running.port, _client(pki, version))
    assert negotiated == version.name.replace("v1_", "v1.")
    assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(b'{"status":"ok"}')


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
async def test_tls_before_1_2_is_refused(tls_gateway: Gateway, pki: Pki,
                                         version: ssl.TLSVersion) -> None:
    client = _client(pki, version)
    async with _lenient_server(pki) as control:
        negotiated, _ = await _health(control, client)  # this client can speak TLS 1.x
    assert negotiated == version.name.replace("v1_", "v1.")
    with pytest.raises(REFUSED):
        await _health(tls_gateway.running.port, client)
    # The proxy is still up for everyone else.
    assert (await _health(tls_gateway.running.port, _client(pki, ssl.TLSVersion.TLSv1_2)))[0]


# CBC suites (with SHA-1 and SHA-2 MACs). Suites without ECDHE need an RSA key: our
# ECDSA certificate cannot be served with them anyway.
@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"])
async def test_tls_1_2_without_ecdhe_and_aead_is_refused(tls_gateway: Gateway, pki: Pki,
                                                         suite: str) -> None:
    client = _client(pki, ssl.TLSVersion.TLSv1_2, f"{suite}:@SECLEVEL=0")
    async with _lenient_server(pki) as control:
        await _health(control, client)  # the suite exists and this client offers it
    with pytest.raises(REFUSED):
        await _health(tls_gateway.running.port, client)


async def test_plain_http_on_the_tls_port_gets_no_answer(tls_gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_gateway.running.port)
    writer.write(_HEALTH)
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        data = b""
    finally:
        writer.close()
    assert b"200" not in data and b"ok" not in data


async def test_a_client_that_never_finishes_its_handshake_is_cut_off(
    start_gateway: GatewayFactory, pki: Pki,
) -> None:
    """A stalled handshake gets the head timeout (asyncio's default would be 60 s):
    connecting and saying nothing cannot hold a socket for longer than a stalled head."""
    gw: Gateway = await start_gateway(QNP_TLS_CERT=str(pki.cert), QNP_TLS_KEY=str(pki.key),
                                      QNP_HTTP_HEAD_TIMEOUT="0.3")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.running.port)
    try:
        data = await asyncio.wait_for(reader.read(), 20)  # generous: only the end matters
    except ConnectionResetError:
        data = b""
    finally:
        writer.close()
    assert data == b""


async def test_openai_sdk_through_https_non_stream_and_stream(
    tls_gateway: Gateway, pki: Pki, api_key: str, mock_upstream: MockOpenAIUpstream,
) -> None:
    mock_upstream.behaviour.chunks = 5
    trust = ssl.create_default_context(cafile=pki.ca)
    async with httpx.AsyncClient(verify=trust) as http, \
            tls_gateway.client(api_key, http_client=http) as client:
        reply = await client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content
        stream = await client.chat.completions.create(
            model="demo-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    assert len([p for p in pieces if p]) == 5
    events = await tls_gateway.events(2)
    assert [e.outcome for e in events] == ["ok", "ok"]
    assert [e.stream for e in events] == [False, True]


async def test_a_client_that_does_not_trust_the_ca_is_refused(
    tls_gateway: Gateway, pki: Pki, api_key: str,
) -> None:
    wrong = ssl.create_default_context(cafile=pki.other_ca)
    async with httpx.AsyncClient(verify=wrong) as http, \
            tls_gateway.client(api_key, http_client=http) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.models.list()


def test_cert_and_key_go_together(tmp_path: Path, pki: Pki) -> None:
    catalog = write_catalog(tmp_path, "http://127.0.0.1:9/v1")
    env = proxy_env("redis://127.0.0.1:9/0", RedisNames("t"), catalog)
    with pytest.raises(SettingsError, match="QNP_TLS_KEY"):
        load({**env, "QNP_TLS_CERT": str(pki.cert)})
    with pytest.raises(SettingsError, match="QNP_TLS_CERT"):
        load({**env, "QNP_TLS_CERT": str(tmp_path / "missing.pem"), "QNP_TLS_KEY": str(pki.key)})
    settings = load({**env, "QNP_TLS_CERT": str(pki.cert), "QNP_TLS_KEY": str(pki.key)})
    assert (settings.tls_cert, settings.tls_key) == (pki.cert, pki.key)


def test_missing_certificate_on_the_command_line_is_a_configuration_error(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    catalog = write_catalog(tmp_path, "http://127.0.0.1:9/v1")
    for name, value in proxy_env("redis://127.0.0.1:9/0", RedisNames("t"), catalog).items():
        monkeypatch.setenv(name, value)
    code = proxy_main(["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pki.key)])
    assert code == 2
    assert "--tls-cert" in capsys.readouterr().err


async def test_a_key_that_does_not_match_its_certificate_stops_start_up(
    tmp_path: Path, pki: Pki, redis_url: str, redis_names: RedisNames,
) -> None:
    catalog = write_catalog(tmp_path, "http://127.0.0.1:9/v1")
    settings = load(proxy_env(redis_url, redis_names, catalog, QNP_TLS_CERT=str(pki.cert),
                              QNP_TLS_KEY=str(pki.client_key)))
    with pytest.raises(TlsError, match=str(pki.cert)):
        await server.start(settings)


@contextlib.contextmanager
def _proxy_process(tmp_path: Path, env: dict[str, str], pki: Pki,
                   port: int) -> Iterator[ModuleProcess]:
    argv = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--port", str(port)]
    with ModuleProcess("proxy", argv, log_path=tmp_path / "proxy.log", env=env) as proc:
        proc.wait_for_log(f"proxy listening on https://127.0.0.1:{port}")
        yield proc


async def test_python_m_proxy_serves_https_on_uvloop(
    tmp_path: Path, pki: Pki, redis_url: str, redis_names: RedisNames, redis: aioredis.Redis,
    mock_upstream: MockOpenAIUpstream,
) -> None:
    """The real process (uvloop's TLS, not asyncio's): the SDK streams through it."""
    port = free_port()
    env = proxy_env(redis_url, redis_names, write_catalog(tmp_path, mock_upstream.base_url))
    key, _ = await publish_key(redis, redis_names)
    mock_upstream.behaviour.chunks = 4
    with _proxy_process(tmp_path, env, pki, port):
        trust = ssl.create_default_context(cafile=pki.ca)
        async with httpx.AsyncClient(verify=trust) as http, openai.AsyncOpenAI(
                base_url=f"https://localhost:{port}/v1", api_key=key, max_retries=0,
                http_client=http) as client:
            stream = await client.chat.completions.create(
                model="demo-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            pieces = [c.choices[0].delta.content async for c in stream if c.choices]
            negotiated, _ = await _health(port, _client(pki, ssl.TLSVersion.TLSv1_2))
            with pytest.raises(REFUSED):
                await _health(port, _client(pki, ssl.TLSVersion.TLSv1_1))
    assert len([p for p in pieces if p]) == 4
    assert negotiated == "TLSv1.2"
