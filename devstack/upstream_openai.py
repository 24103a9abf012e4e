"""A mock OpenAI upstream that speaks the real chat-completions wire format.

Owns: the fake provider used in place of OpenAI by the `make run` demo, the tests and
the benchmarks. It answers ``POST /v1/chat/completions`` (JSON or SSE stream, with
``stream_options.include_usage``), ``/v1/embeddings``, legacy ``/v1/completions``,
``GET /v1/models``, and OpenAI-style errors; its
behaviour (reply, chunking, delays, forced errors, api key) can be changed between
requests, and it records every request it receives. Token counts are deterministic, and
the counting is public (``count_prompt_tokens``, ``expected_usage``) so tests can work
out the cost the gateway should charge.

Must not import ``proxy``, ``control_plane`` or ``shared``: it stands in for the outside.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import re
import secrets
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger(__name__)

DEFAULT_REPLY = "Hello! This reply comes from the QNP mock upstream."
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o4-mini")
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_SYSTEM_FINGERPRINT = "fp_qnpmock"
_SHUTDOWN_TIMEOUT = 1.0  # a request parked in a long delay must not hold up close()
_WORD = re.compile(r"\S+")
_DONE = b"data: [DONE]\n\n"


@dataclass
class UpstreamBehaviour:
    """What the mock does with the next request; tests may change it between requests."""

    reply: str = DEFAULT_REPLY
    # None: one content chunk per word of ``reply``. N: exactly N one-word chunks,
    # cycling through the reply's words (for long streams in benchmarks).
    chunks: int | None = None
    # Seconds before anything is sent, headers included: lets a proxy's first-byte
    # timeout fire.
    first_byte_delay: float = 0.0
    chunk_delay: float = 0.0  # seconds between two stream chunks
    error_status: int | None = None  # e.g. 429 or 500: answer with an OpenAI error body
    api_key: str | None = None  # when set, requests must carry "Bearer <api_key>"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: Any  # the parsed JSON body; None when absent or not JSON


class OpenAIError(Exception):
    """An error the mock answers with, in OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return _json_response(body, status=self.status, headers=headers)


# --- token accounting (public: tests derive expected costs from it) --------------------


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens the mock reports: ~1 per 4 characters of text, plus 4 per message
    and 3 for the reply's priming, like OpenAI's chat format overhead."""
    total = 3
    for message in messages:
        text = _message_text(message.get("content"))
        total += 4 + (len(text) + 3) // 4
        if isinstance(message.get("name"), str):
            total += 1
    return max(1, total)


def reply_pieces(behaviour: UpstreamBehaviour, max_tokens: int | None = None) -> list[str]:
    """The content pieces the mock sends; each one counts as one completion token."""
    words = _WORD.findall(behaviour.reply)
    count = len(words) if behaviour.chunks is None else behaviour.chunks
    if not words:
        count = 0
    if max_tokens is not None:
        count = min(count, max_tokens)
    return [("" if i == 0 else " ") + words[i % len(words)] for i in range(count)]


def expected_usage(body: Mapping[str, Any], behaviour: UpstreamBehaviour) -> dict[str, Any]:
    """The ``usage`` object the mock reports for a request body under ``behaviour``."""
    completion = len(reply_pieces(behaviour, _max_tokens(body)))
    return _usage(count_prompt_tokens(body["messages"]), completion)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


# --- request validation ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None


def _parse_chat(body: Any) -> _ChatRequest:
    if not isinstance(body, dict):
        raise OpenAIError(400, "We could not parse the JSON body of your request.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "you must provide a model parameter")
    messages = body.get("messages")
    if messages is None:
        raise _invalid(
            "messages", "Missing required parameter: 'messages'.", "missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise _invalid(
            "messages", "Invalid type for 'messages': expected an array.", "invalid_type"
        )
    if not messages:
        raise _invalid("messages", "Invalid 'messages': empty array.", "empty_array")
    for i, message in enumerate(messages):
        _check_message(i, message)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _invalid("stream", "Invalid type for 'stream': expected a boolean.", "invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            raise _invalid("stream_options", message, "invalid_value")
        if not isinstance(options, dict) or not isinstance(
            options.get("include_usage", False), bool
        ):
            message = "Invalid type for 'stream_options.include_usage': expected a boolean."
            raise _invalid("stream_options.include_usage", message, "invalid_type")
        include_usage = bool(options.get("include_usage", False))
    max_tokens = _max_tokens(body)
    if max_tokens is not None and max_tokens < 1:
        raise _invalid(
            "max_tokens", "Invalid 'max_tokens': must be at least 1.", "integer_below_min_value"
        )
    return _ChatRequest(model, messages, bool(stream), include_usage, max_tokens)


def _check_message(i: int, message: Any) -> None:
    if not isinstance(message, dict):
        raise _invalid(
            f"messages[{i}]",
            f"Invalid type for 'messages[{i}]': expected an object.",
            "invalid_type",
        )
    if message.get("role") not in _ROLES:
        text = (
            f"Invalid value for 'messages[{i}].role': expected one of {', '.join(sorted(_ROLES))}."
        )
        raise _invalid(f"messages[{i}].role", text, "invalid_value")
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        text = f"Invalid type for 'messages[{i}].content': expected a string or an array."
        raise _invalid(f"messages[{i}].content", text, "invalid_type")


def _invalid(param: str, message: str, code: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _forced_error(status: int) -> OpenAIError:
    if status == 429:
        return OpenAIError(
            429,
            "Rate limit reached for requests (mock upstream).",
            type_="requests",
            code="rate_limit_exceeded",
        )
    if status >= 500:
        message = "The server had an error while processing your request. Sorry about that!"
        return OpenAIError(status, message, type_="server_error")
    return OpenAIError(status, f"Mock upstream error {status}.")


def _json_response(
    body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


# --- the server --------------------------------------------------------------------------


@dataclass
class _Completion:
    """Everything one answer needs, fixed when the request arrives."""

    request: _ChatRequest
    pieces: list[str]
    finish_reason: str
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(cls, request: _ChatRequest, behaviour: UpstreamBehaviour) -> _Completion:
        pieces = reply_pieces(behaviour, request.max_tokens)
        untruncated = len(reply_pieces(behaviour))
        finish_reason = "length" if len(pieces) < untruncated else "stop"
        return cls(request, pieces, finish_reason)

    def usage(self) -> dict[str, Any]:
        return _usage(count_prompt_tokens(self.request.messages), len(self.pieces))

    def message(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(self.pieces),
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage(),
            "service_tier": "default",
            "system_fingerprint": _SYSTEM_FINGERPRINT,
        }

    def chunks(self) -> list[dict[str, Any]]:
        deltas: list[tuple[dict[str, Any], str | None]] = [
            ({"role": "assistant", "content": "", "refusal": None}, None),
            *(({"content": piece}, None) for piece in self.pieces),
            ({}, self.finish_reason),
        ]
        chunks = [
            self._chunk([{"index": 0, "delta": d, "logprobs": None, "finish_reason": f}])
            for d, f in deltas
        ]
        if self.request.include_usage:
            chunks.append(self._chunk([]) | {"usage": self.usage()})
        return chunks

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.request.model,
            "service_tier": "default",
            "system_fingerprint": _SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if self.request.include_usage:
            chunk["usage"] = None  # as OpenAI does on every chunk but the last
        return chunk


class MockOpenAIUpstream:
    """``async with MockOpenAIUpstream() as up:`` serves on 127.0.0.1 at ``up.base_url``."""

    def __init__(
        self,
        port: int = 0,
        behaviour: UpstreamBehaviour | None = None,
        *,
        host: str = "127.0.0.1",
    ) -> None:
        self.behaviour = behaviour if behaviour is not None else UpstreamBehaviour()
        self.requests: list[RecordedRequest] = []
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the mock upstream is not running")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._requested_port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MockOpenAIUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _record(self, request: web.Request) -> tuple[Any, bool]:
        """Record the request; return its JSON body and whether that body parsed."""
        raw = await request.read()
        body: Any = None
        parsed = True
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = False
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        self.requests.append(RecordedRequest(request.method, request.path, headers, body))
        return body, parsed

    def _authenticate(self, request: web.Request, behaviour: UpstreamBehaviour) -> None:
        if behaviour.api_key is None:
            return
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise OpenAIError(
                401, "You didn't provide an API key. Use 'Authorization: Bearer YOUR_KEY'."
            )
        if not secrets.compare_digest(header.removeprefix("Bearer "), behaviour.api_key):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body, parsed = await self._record(request)
        # A snapshot, so a test changing the behaviour mid-stream affects only later requests.
        behaviour = dataclasses.replace(self.behaviour)
        if behaviour.first_byte_delay > 0:
            await asyncio.sleep(behaviour.first_byte_delay)
        try:
            self._authenticate(request, behaviour)
            if not parsed:
                raise OpenAIError(400, "We could not parse the JSON body of your request.")
            chat = _parse_chat(body)
            if behaviour.error_status is not None:
                raise _forced_error(behaviour.error_status)
        except OpenAIError as exc:
            return exc.response()
        completion = _Completion.build(chat, behaviour)
        headers = {"x-request-id": f"req_{secrets.token_hex(16)}"}
        if not chat.stream:
            return _json_response(completion.message(), headers=headers)
        return await _stream(request, completion, behaviour.chunk_delay, headers)

    async def _embeddings(self, request: web.Request) -> web.Response:
        body, _ = await self._record(request)
        try:
            self._authenticate(request, self.behaviour)
            if not isinstance(body, dict) or not isinstance(body.get("input"), str | list):
                raise _invalid("input", "Missing required parameter: 'input'.",
                               "missing_required_parameter")
        except OpenAIError as exc:
            return exc.response()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(max(1, (len(str(i)) + 3) // 4) for i in inputs)
        data = [{"object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3]}
                for i in range(len(inputs))]
        return _json_response({"object": "list", "data": data, "model": body.get("model"),
                               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _completions(self, request: web.Request) -> web.Response:
        body, _ = await self._record(request)
        try:
            self._authenticate(request, self.behaviour)
            if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
                raise _invalid("prompt", "Missing required parameter: 'prompt'.",
                               "missing_required_parameter")
        except OpenAIError as exc:
            return exc.response()
        pieces = reply_pieces(self.behaviour, _max_tokens(body))
        prompt = max(1, (len(body["prompt"]) + 3) // 4)
        return _json_response({
            "id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
            "created": int(time.time()), "model": body.get("model"),
            "choices": [{"text": "".join(pieces), "index": 0, "logprobs": None,
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": len(pieces),
                      "total_tokens": prompt + len(pieces)}})

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        try:
            self._authenticate(request, self.behaviour)
        except OpenAIError as exc:
            return exc.response()
        data = [
            {"id": model, "object": "model", "created": 1_715_367_049, "owned_by": "system"}
            for model in MODELS
        ]
        return _json_response({"object": "list", "data": data})

    async def _not_found(self, request: web.Request) -> web.Response:
        await self._record(request)
        return OpenAIError(404, f"Invalid URL ({request.method} {request.path})").response()


async def _stream(
    request: web.Request, completion: _Completion, chunk_delay: float, headers: dict[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        | headers
    )
    try:
        await response.prepare(request)
        for i, chunk in enumerate(completion.chunks()):
            if i and chunk_delay > 0:
                await asyncio.sleep(chunk_delay)
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(_DONE)
        await response.write_eof()
    except ConnectionResetError:
        # The client went away mid-stream: normal for an upstream, nothing to report.
        log.debug("client disconnected from %s mid-stream", completion.id)
    return response


# --- python -m devstack.upstream_openai ------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    behaviour = UpstreamBehaviour(
        reply=args.reply,
        chunks=args.chunks,
        first_byte_delay=args.first_byte_delay,
        chunk_delay=args.chunk_delay,
        api_key=args.api_key,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with MockOpenAIUpstream(args.port, behaviour, host=args.host) as upstream:
        print(f"mock OpenAI upstream listening on {upstream.base_url}", flush=True)
        await stop.wait()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.upstream_openai",
        description="Serve a mock OpenAI chat-completions API until Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer <key>'")
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    parser.add_argument("--chunks", type=int, help="content chunks per stream")
    parser.add_argument("--first-byte-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--chunk-delay", type=float, default=0.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args))
    else:
        uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
