"""``python -m proxy`` as a real process: workers sharing a port, graceful SIGTERM, and
one metrics scrape that reports the whole process group."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import tempfile
from pathlib import Path

import aiohttp
import openai
import redis.asyncio as aioredis

from devstack.upstream_openai import MockOpenAIUpstream
from proxy.metrics_group import read_socket
from shared.events import STREAM_FIELD, decode
from shared.redis_names import RedisNames
from tests.proxy.conftest import proxy_env, publish_key, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http, wait_until_gone

MESSAGES = [{"role": "user", "content": "Count slowly."}]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def _events(redis: aioredis.Redis, names: RedisNames) -> list[object]:
    return [decode(f[STREAM_FIELD]) for _i, f in await redis.xrange(names.events)]


async def test_sigterm_lets_open_streams_finish_and_flushes_their_events(
    tmp_path: Path, redis_url: str, redis_names: RedisNames, redis: aioredis.Redis,
    mock_upstream: MockOpenAIUpstream,
) -> None:
    port = free_port()
    env = proxy_env(redis_url, redis_names, write_catalog(tmp_path, mock_upstream.base_url),
                    QNP_PROXY_PORT=str(port), QNP_SHUTDOWN_GRACE="20",
                    QNP_EVENT_FLUSH_MS="1000")  # events still buffered when SIGTERM lands
    key, _ = await publish_key(redis, redis_names)
    mock_upstream.behaviour.chunks = 30
    mock_upstream.behaviour.chunk_delay = 0.03
    with ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env) as proc:
        await wait_for_http(f"http://127.0.0.1:{port}/readyz", expect_status=200)
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key,
                                      max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="demo-mini", messages=MESSAGES, stream=True  # type: ignore[arg-type]
            )
            pieces = []
            async for chunk in stream:
                if not pieces:
                    proc.proc.send_signal(signal.SIGTERM)
                pieces.extend(c.delta.content or "" for c in chunk.choices)
        code = await asyncio.to_thread(proc.proc.wait, 30)
    assert code == 0, proc.log_text()
    assert len([p for p in pieces if p]) == 30, "the open stream was cut by shutdown"
    [event] = await _events(redis, redis_names)
    assert event.outcome == "ok" and event.usage_source == "upstream"  # type: ignore[attr-defined]


async def test_two_workers_share_the_port_and_stop_together(
    tmp_path: Path, redis_url: str, redis_names: RedisNames, redis: aioredis.Redis,
    mock_upstream: MockOpenAIUpstream,
) -> None:
    port = free_port()
    env = proxy_env(redis_url, redis_names, write_catalog(tmp_path, mock_upstream.base_url),
                    QNP_PROXY_PORT=str(port))
    key, _ = await publish_key(redis, redis_names)
    with ModuleProcess("proxy", ["--workers", "2"], log_path=tmp_path / "proxy.log",
                       env=env) as proc:
        await wait_for_http(f"http://127.0.0.1:{port}/readyz", expect_status=200)
        workers = _children(proc.pid)
        assert len(workers) == 2

        async def one() -> str | None:
            # A fresh client per request: a fresh connection the kernel may give either worker.
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                          api_key=key, max_retries=0) as client:
                r = await client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
                return r.choices[0].message.content

        answers = await asyncio.gather(*(one() for _ in range(40)))
        assert all(answers)
        proc.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.proc.wait, 30)
    assert code == 0, proc.log_text()
    assert all(wait_until_gone(pid) for pid in workers)
    # Every request left its event. The stream is at-least-once (a batch whose reply was
    # lost is sent again); ingest stores each event id once, so ids are what count.
    assert len({e.id for e in await _events(redis, redis_names)}) == 40  # type: ignore[attr-defined]
    assert "Traceback" not in proc.log_text()


def _served(text: str) -> float:
    """qnp_requests_total for demo-mini / 200 in one exposition (0 if absent)."""
    match = re.search(r'^qnp_requests_total\{model="demo-mini",status="200"\} (\S+)$', text,
                      re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_one_scrape_counts_every_request_of_two_workers(
    tmp_path: Path, redis_url: str, redis_names: RedisNames, redis: aioredis.Redis,
    mock_upstream: MockOpenAIUpstream,
) -> None:
    port, metrics_port = free_port(), free_port()
    env = proxy_env(redis_url, redis_names, write_catalog(tmp_path, mock_upstream.base_url),
                    QNP_PROXY_PORT=str(port), QNP_METRICS_PORT=str(metrics_port))
    key, _ = await publish_key(redis, redis_names)
    n = 40
    with ModuleProcess("proxy", ["--workers", "2"], log_path=tmp_path / "proxy.log",
                       env=env) as proc:
        await wait_for_http(f"http://127.0.0.1:{port}/readyz", expect_status=200)
        await wait_for_http(f"http://127.0.0.1:{metrics_port}/healthz", expect_status=200)
        workers = _children(proc.pid)
        # Both workers listening (each opens its metrics socket after its public port),
        # or the kernel would hand every connection to the first one up.
        for _ in range(300):
            sockets = [p for p in Path(tempfile.gettempdir()).glob("qnp-metrics-*/*.sock")
                       if int(p.stem) in workers]
            if len(sockets) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(sockets) == 2, proc.log_text()
        body = {"model": "demo-mini", "messages": MESSAGES}
        async with aiohttp.ClientSession() as s:
            async def one() -> int:
                # A fresh connection each: the kernel spreads them over both workers.
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                  headers={"Authorization": f"Bearer {key}",
                                           "Connection": "close"}) as r:
                    await r.read()
                    return r.status

            assert await asyncio.gather(*(one() for _ in range(n))) == [200] * n
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 404  # never on the public port
            async with s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                assert r.status == 200
                text = await r.text()
        # Each worker's own share, read the way the supervisor reads it.
        shares = [_served(await read_socket(p) or "") for p in sockets]
        proc.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.proc.wait, 30)
    assert code == 0, proc.log_text()
    assert all(share > 0 for share in shares), f"one worker served all: {shares}"
    assert sum(shares) == n
    assert _served(text) == n, "one scrape must count every worker's requests"
    assert "qnp_metrics_workers_unreachable 0.0" in text
    assert "qnp_inflight_streams 0.0" in text
    assert not sockets[0].parent.exists(), "the instance's metrics folder outlived it"


async def test_a_taken_metrics_port_is_one_error_line_and_exit_1(
    tmp_path: Path, redis_url: str, redis_names: RedisNames, mock_upstream: MockOpenAIUpstream,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = proxy_env(redis_url, redis_names, write_catalog(tmp_path, mock_upstream.base_url),
                        QNP_PROXY_PORT=str(free_port()),
                        QNP_METRICS_PORT=str(taken.getsockname()[1]))
        with ModuleProcess("proxy", log_path=tmp_path / "proxy.log", env=env) as proc:
            code = await asyncio.to_thread(proc.proc.wait, 30)
    assert code == 1
    assert "is in use (QNP_METRICS_PORT)" in proc.log_text()
    assert "Traceback" not in proc.log_text()
