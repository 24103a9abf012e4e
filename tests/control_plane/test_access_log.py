"""The control plane's access log: what an operator needs, never what it must not keep.

A sign-in callback carries the authorization code and state in its query string, and
links in e-mails carry tokens there: none of it, nor the client's address or user
agent, may reach a log line, while the request itself is still logged.
"""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from control_plane.logs import AccessLog

CANARY = "canary-code-5f1e9a"


async def test_access_lines_keep_method_path_and_status_but_no_query_or_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def callback(_request: web.Request) -> web.Response:
        return web.Response(status=303, headers={"Location": "/"})

    app = web.Application()
    app.router.add_get("/auth/callback/dev", callback)
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    server = TestServer(app)
    await server.start_server(access_log_class=AccessLog)  # as roles.Listener runs it
    async with TestClient(server) as client:
        resp = await client.get(f"/auth/callback/dev?code={CANARY}&state={CANARY}",
                                headers={"User-Agent": f"agent-{CANARY}",
                                         "X-Forwarded-For": "203.0.113.9"},
                                allow_redirects=False)
        assert resp.status == 303
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert lines == [lines[0]] and "method=GET path=/auth/callback/dev status=303" in lines[0]
    text = "\n".join(lines)
    assert CANARY not in text and "127.0.0.1" not in text and "203.0.113.9" not in text
