"""A mock Anthropic upstream that speaks the real Messages wire format.

Owns: ``POST /v1/messages`` (JSON or SSE), ``GET /v1/models`` and Anthropic-style
errors, with the stream's quirks: ``message_start`` carries input, cache-creation and
cache-read tokens apart, plus a first ``output_tokens``; ``message_delta`` usage is
cumulative (it repeats the input side, so summing double-counts); ``ping`` events
interleave; an ``error`` event can arrive mid-stream (``error_after``). Needs
``x-api-key`` or ``Authorization: Bearer`` (when configured) and ``anthropic-version``.

Must not import ``proxy``, ``control_plane`` or ``shared``: it stands in for the outside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import secrets
import signal
import sys
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

from devstack.mock_server import (
    MockBehaviour,
    MockServer,
    json_response,
    pieces,
    prompt_tokens,
)

MODELS = ("claude-demo-haiku", "claude-demo-sonnet")


def _error(status: int, message: str) -> web.Response:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 529: "overloaded_error"}
    kind = kinds.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return json_response({"type": "error", "error": {"type": kind, "message": message}}, status)


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _texts(body: dict[str, Any]) -> list[str]:
    texts = [body["system"]] if isinstance(body.get("system"), str) else []
    for m in body["messages"]:
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(b.get("text", "") for b in content if isinstance(b, dict)
                         and isinstance(b.get("text"), str))
    return texts


class MockAnthropicUpstream(MockServer):
    base_path = "/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/models", self._models)

    async def _models(self, request: web.Request) -> web.Response:
        await self.record(request)
        return json_response({"data": [{"type": "model", "id": m, "display_name": m}
                                       for m in MODELS], "has_more": False})

    def _refusal(self, request: web.Request, body: Any, b: MockBehaviour) -> web.Response | None:
        key = request.headers.get("x-api-key") or \
            request.headers.get("Authorization", "").removeprefix("Bearer ")
        if b.api_key is not None and key != b.api_key:
            return _error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version: header is required")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "model: Field required")
        if not isinstance(body.get("max_tokens"), int):
            return _error(400, "max_tokens: Field required")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "messages: at least one message is required")
        if b.error_status is not None:
            return _error(b.error_status, "Overloaded" if b.error_status == 529
                          else f"Mock upstream error {b.error_status}.")
        return None

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body, b = await self.record(request)

        async def answer() -> web.StreamResponse:
            refused = self._refusal(request, body, b)
            if refused is not None:
                return refused
            return await self._answer(request, body, b)

        return await self.delayed(b, answer)

    async def _answer(self, request: web.Request, body: dict[str, Any],
                      b: MockBehaviour) -> web.StreamResponse:
        texts = pieces(b, body["max_tokens"])
        tool = b.tool_call if body.get("tools") else None
        output = len(texts) + (5 if tool else 0) + b.reasoning_tokens
        usage = {"input_tokens": prompt_tokens(_texts(body), len(body["messages"])),
                 "cache_creation_input_tokens": b.cache_write_tokens,
                 "cache_read_input_tokens": b.cache_read_tokens, "output_tokens": output}
        stop = "tool_use" if tool else (
            "max_tokens" if len(texts) < len(pieces(b)) else "end_turn")
        if not b.omit_usage:
            self.reported_usage.append(usage)
        message: dict[str, Any] = {
            "id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant",
            "model": body["model"], "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1}}
        blocks: list[dict[str, Any]] = [{"type": "text", "text": "".join(texts)}]
        if tool:
            blocks.append({"type": "tool_use", "id": f"toolu_{secrets.token_hex(8)}",
                           "name": tool[0], "input": tool[1]})
        if not body.get("stream"):
            done = {**message, "content": blocks, "stop_reason": stop, "usage": usage}
            if b.omit_usage:
                del done["usage"]
            return json_response(done)
        if b.omit_usage:
            del message["usage"]
        events = [_event("message_start", {"type": "message_start", "message": message}),
                  _event("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": {"type": "text", "text": ""}}),
                  _event("ping", {"type": "ping"})]
        events += [_event("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": t}}) for t in texts]
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if tool:
            args = orjson.dumps(tool[1]).decode()
            events += [
                _event("content_block_start", {"type": "content_block_start", "index": 1,
                                               "content_block": {**blocks[1], "input": {}}}),
                _event("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
                    "type": "input_json_delta", "partial_json": args[: len(args) // 2]}}),
                _event("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
                    "type": "input_json_delta", "partial_json": args[len(args) // 2:]}}),
                _event("content_block_stop", {"type": "content_block_stop", "index": 1})]
        delta: dict[str, Any] = {"type": "message_delta",
                                 "delta": {"stop_reason": stop, "stop_sequence": None}}
        if not b.omit_usage:
            delta["usage"] = usage  # cumulative: repeats the input side
        events += [_event("message_delta", delta), _event("message_stop", {"type": "message_stop"})]
        error = _event("error", {"type": "error", "error": {"type": "overloaded_error",
                                                            "message": "Overloaded"}})
        # error_after / stall_after count text pieces: events before them are not pieces.
        shifted = dataclasses.replace(
            b, error_after=None if b.error_after is None else b.error_after + 2,
            stall_after=None if b.stall_after is None else b.stall_after + 2)
        return await self.stream(request, shifted, events, error_event=error)


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    behaviour = MockBehaviour(api_key=args.api_key)
    async with MockAnthropicUpstream(behaviour=behaviour, port=args.port) as upstream:
        print(f"mock Anthropic upstream listening on {upstream.base_url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.upstream_anthropic")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
