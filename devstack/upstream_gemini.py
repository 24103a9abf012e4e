"""A mock Google Gemini upstream that speaks the real generateContent wire format.

Owns: ``POST /v1beta/models/{model}:generateContent`` and
``:streamGenerateContent?alt=sse`` and Google-style errors, with the quirks: the key
comes as ``x-goog-api-key`` or ``?key=``; events end with ``\\r\\n\\r\\n``; every chunk
is a whole response with ``usageMetadata`` (running counts; the totals, cached and
thinking tokens on the final chunk); function calls arrive whole, and the finish reason
stays ``STOP`` when the model calls a tool.

Must not import ``proxy``, ``control_plane`` or ``shared``: it stands in for the outside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

MODELS = ("gemini-demo-flash", "gemini-demo-pro")
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def _error(status: int, message: str) -> web.Response:
    return json_response({"error": {"code": status, "message": message,
                                    "status": _STATUS.get(status, "UNKNOWN")}}, status)


def _texts(body: dict[str, Any]) -> tuple[list[str], int]:
    texts: list[str] = []
    system = body.get("systemInstruction")
    if isinstance(system, dict):
        texts += [p.get("text", "") for p in system.get("parts") or () if isinstance(p, dict)]
    contents = body["contents"]
    for c in contents:
        texts += [p["text"] for p in c.get("parts") or ()
                  if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return texts, len(contents)


def _event(doc: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\r\n\r\n"


class MockGeminiUpstream(MockServer):
    base_path = "/v1beta"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{call}", self._call)

    def _refusal(self, request: web.Request, body: Any, b: MockBehaviour) -> web.Response | None:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if b.api_key is not None and key != b.api_key:
            return _error(403 if key else 401, "API key not valid. Please pass a valid API key.")
        if not isinstance(body, dict) or not isinstance(body.get("contents"), list) \
                or not body["contents"]:
            return _error(400, "* GenerateContentRequest.contents: contents is not specified")
        if b.error_status is not None:
            return _error(b.error_status, f"Mock upstream error {b.error_status}.")
        return None

    async def _call(self, request: web.Request) -> web.StreamResponse:
        body, b = await self.record(request)
        model, _, action = request.match_info["call"].partition(":")

        async def answer() -> web.StreamResponse:
            if action not in ("generateContent", "streamGenerateContent"):
                return _error(404, f"Method {action} not found.")
            refused = self._refusal(request, body, b)
            if refused is not None:
                return refused
            return await self._answer(request, body, b, model, action == "streamGenerateContent")

        return await self.delayed(b, answer)

    async def _answer(self, request: web.Request, body: dict[str, Any], b: MockBehaviour,
                      model: str, stream: bool) -> web.StreamResponse:
        config = body.get("generationConfig") or {}
        texts = pieces(b, config.get("maxOutputTokens"))
        tool = b.tool_call if body.get("tools") else None
        words, messages = _texts(body)
        prompt = prompt_tokens(words, messages) + b.cache_read_tokens
        candidates = len(texts) + (5 if tool else 0)
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": candidates,
                 "totalTokenCount": prompt + candidates + b.reasoning_tokens}
        if b.cache_read_tokens:
            usage["cachedContentTokenCount"] = b.cache_read_tokens
        if b.reasoning_tokens:
            usage["thoughtsTokenCount"] = b.reasoning_tokens
        if not b.omit_usage:
            self.reported_usage.append(usage)
        finish = "MAX_TOKENS" if len(texts) < len(pieces(b)) else "STOP"
        response_id = secrets.token_urlsafe(16)

        def chunk(parts: list[dict[str, Any]], done: bool, counted: int) -> dict[str, Any]:
            candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"},
                                         "index": 0}
            if done:
                candidate["finishReason"] = finish
            doc: dict[str, Any] = {"candidates": [candidate]}
            if not b.omit_usage:
                doc["usageMetadata"] = usage if done else {
                    "promptTokenCount": prompt, "candidatesTokenCount": counted,
                    "totalTokenCount": prompt + counted}
            return doc | {"modelVersion": model, "responseId": response_id}

        tool_parts = [{"functionCall": {"name": tool[0], "args": tool[1]}}] if tool else []
        if not stream or request.query.get("alt") != "sse":
            whole = chunk([{"text": "".join(texts)}, *tool_parts], True, candidates)
            return json_response(whole if stream is False else [whole])
        events = [_event(chunk([{"text": t}], False, i + 1)) for i, t in enumerate(texts)]
        events.append(_event(chunk(tool_parts or [{"text": ""}], True, candidates)))
        error = _event({"error": {"code": 503, "message": "The model is overloaded.",
                                  "status": "UNAVAILABLE"}})
        return await self.stream(request, b, [b"", *events], error_event=error)


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    behaviour = MockBehaviour(api_key=args.api_key)
    async with MockGeminiUpstream(behaviour=behaviour, port=args.port) as upstream:
        print(f"mock Gemini upstream listening on {upstream.base_url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.upstream_gemini")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
