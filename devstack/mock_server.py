"""What the Anthropic and Gemini mock upstreams share: lifecycle, behaviour knobs,
request recording, disconnect tracking and paced streaming.

Owns: ``MockBehaviour`` (what the next request gets: reply, chunking, delays, forced
errors, mid-stream errors, stalls, missing usage, cache/reasoning token counts, tool
calls) and ``MockServer`` (serve on 127.0.0.1, record requests, note when a client
closed its connection mid-answer). Token counts are deterministic: a prompt costs one
token per 4 characters plus 3 per message, each reply piece one token.

Must not import ``proxy``, ``control_plane`` or ``shared``: it stands in for the outside.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

DEFAULT_REPLY = "Hello! This reply comes from the QNP mock upstream."
_WORD = re.compile(r"\S+")
_SHUTDOWN_TIMEOUT = 1.0


@dataclass
class MockBehaviour:
    reply: str = DEFAULT_REPLY
    chunks: int | None = None  # None: one piece per word of ``reply``
    first_byte_delay: float = 0.0  # before anything, headers included
    first_chunk_delay: float = 0.0  # after the headers, before the first body byte
    chunk_delay: float = 0.0
    error_status: int | None = None  # answer with this status and an error body
    error_after: int | None = None  # an error event mid-stream after N pieces
    stall_after: int | None = None  # stop sending (connection kept open) after N pieces
    omit_usage: bool = False  # a non-conforming server that never reports usage
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    tool_call: tuple[str, dict[str, Any]] | None = None  # answered when tools are offered
    api_key: str | None = None


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]
    body: Any


@dataclass
class MockServer:
    """Base of a mock upstream: ``async with Mock() as up:`` serves at ``up.base_url``."""

    behaviour: MockBehaviour = field(default_factory=MockBehaviour)
    port: int = 0
    host: str = "127.0.0.1"
    requests: list[RecordedRequest] = field(default_factory=list)
    reported_usage: list[dict[str, Any]] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)  # monotonic times
    _runner: web.AppRunner | None = None
    base_path = ""

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}{self.base_path}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT,
                               handler_cancellation=True)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def record(self, request: web.Request) -> tuple[Any, MockBehaviour]:
        """Record the request; its JSON body (None if not JSON) and a behaviour snapshot."""
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        self.requests.append(RecordedRequest(
            request.method, request.path, dict(request.query),
            CIMultiDictProxy(CIMultiDict(request.headers)), body))
        return body, dataclasses.replace(self.behaviour)

    async def delayed(self, behaviour: MockBehaviour,
                      answer: Callable[[], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """``answer()`` after ``first_byte_delay``; a client leaving meanwhile is noted."""
        try:
            if behaviour.first_byte_delay > 0:
                await asyncio.sleep(behaviour.first_byte_delay)
        except asyncio.CancelledError:
            self.disconnects.append(time.monotonic())
            raise
        return await answer()

    async def stream(
        self,
        request: web.Request,
        behaviour: MockBehaviour,
        events: Sequence[bytes],
        *,
        error_event: bytes,
    ) -> web.StreamResponse:
        """Send ``events`` paced by ``behaviour``; the first and last are not pieces."""
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            if behaviour.first_chunk_delay > 0:
                await asyncio.sleep(behaviour.first_chunk_delay)
            for i, event in enumerate(events):
                if i and behaviour.chunk_delay > 0:
                    await asyncio.sleep(behaviour.chunk_delay)
                if behaviour.error_after is not None and i == behaviour.error_after + 1:
                    await response.write(error_event)
                    return response
                if behaviour.stall_after is not None and i == behaviour.stall_after + 1:
                    await asyncio.sleep(3600)
                await response.write(event)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects.append(time.monotonic())
            raise
        return response


def pieces(behaviour: MockBehaviour, max_tokens: int | None = None) -> list[str]:
    words = _WORD.findall(behaviour.reply)
    count = len(words) if behaviour.chunks is None else behaviour.chunks
    if not words:
        count = 0
    if max_tokens is not None:
        count = min(count, max_tokens)
    return [("" if i == 0 else " ") + words[i % len(words)] for i in range(count)]


def prompt_tokens(texts: Sequence[str], messages: int) -> int:
    return max(1, 3 * messages + sum((len(t) + 3) // 4 for t in texts))


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status,
                        content_type="application/json")

