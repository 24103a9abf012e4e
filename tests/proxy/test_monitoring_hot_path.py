"""With SENTRY_DSN set, the proxy's request path runs no Sentry SDK code at all: the SDK
wraps nothing (no auto-enabled integration around Redis, aiohttp or the upstream client)
and the request path logs nothing the logging integration would turn into a breadcrumb.
Counted, not timed: a profiler hook counts every call into ``sentry_sdk`` while
non-stream and stream requests go through a proxy in this process; the benchmark suite's
``--with-sentry`` measures the same from outside (README, "Error monitoring")."""

from __future__ import annotations

import asyncio
import logging
import sys
from types import FrameType
from typing import Any

import aiohttp

from shared import monitoring
from tests.proxy.conftest import Gateway, GatewayFactory, publish_key
from tests.sentry_sink import SentrySink

BODY = {"model": "demo-mini", "messages": [{"role": "user", "content": "Hi"}]}


async def _requests(gw: Gateway, key: str, n: int) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        for i in range(n):
            body = {**BODY, "stream": i % 2 == 1}
            async with s.post(f"{gw.base_url}/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()


async def test_the_request_path_calls_no_sentry_code(start_gateway: GatewayFactory) -> None:
    async with SentrySink() as sink:
        gw = await start_gateway(SENTRY_DSN=sink.dsn())
        assert monitoring.init(gw.settings.sentry_dsn, service="proxy")
        try:
            key, _ = await publish_key(gw.redis, gw.names)
            await _requests(gw, key, 2)  # warm: bcrypt, connections, caches
            calls: list[str] = []

            def profile(frame: FrameType, event: str, arg: Any) -> None:
                if event == "call" and "sentry_sdk" in frame.f_code.co_filename:
                    calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

            # As in production (QNP_LOG_LEVEL=INFO): what the path logs would reach the SDK.
            root, level = logging.getLogger(), logging.getLogger().level
            root.setLevel(logging.INFO)
            sys.setprofile(profile)
            try:
                await _requests(gw, key, 20)
                during_requests = list(calls)
                # The control: what the hook sees when the SDK does work (an ERROR log).
                logging.getLogger("qnp.proxy").error("control event for the hook")
            finally:
                sys.setprofile(None)
                root.setLevel(level)
            assert during_requests == []
            assert calls, "the hook saw no SDK call at all: it proves nothing"
        finally:
            await asyncio.to_thread(monitoring.close)
