"""What the benchmark mock upstream answers: complete HTTP/1.1 responses in the
OpenAI, Anthropic and Gemini wire formats, built once and then served from a cache.

Owns: the ``Scenario`` a model name asks for (``mock-ttft200-chunks50-delay20-tpc2``),
the response builders, and ``Replies``, which routes a request (path, credentials,
JSON body) to its reply, cached per provider, model, stream flags and prompt-token
count. A built ``Reply`` holds the whole response, status line and headers included,
already split into the writes a paced stream makes: the first write carries the head,
the stream's opening events and the first content chunk; each later write one content
chunk; the last one also the closing events and the chunked-encoding terminator.
Token counts: prompt tokens are ``max(1, len(body) // 4)``, completion tokens
``chunks * tokens_per_chunk``; every content chunk is ``tokens_per_chunk`` words.
A cached reply repeats its id and ``created`` time: nothing downstream needs them unique.

Must not import ``proxy``, ``control_plane`` or ``devstack``: it stands in for the
providers, independently of our own mocks.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed"}
_SSE = b"text/event-stream; charset=utf-8"
_JSON = b"application/json"
_FINGERPRINT = "fp_qnpbench"
_TERMINATOR = b"0\r\n\r\n"
_WORD = "tok "
_SCENARIO_PART = re.compile(r"-(ttft|chunks|delay|tpc)(\d+(?:\.\d+)?)")
_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND"}
_ANTHROPIC_ERROR = {400: "invalid_request_error", 401: "authentication_error",
                    404: "not_found_error"}
_CACHE_MAX = 4096  # replies kept; a run uses a handful, so a full cache means odd input
_OPENAI, _ANTHROPIC, _GEMINI = "openai", "anthropic", "gemini"


@dataclass(frozen=True, slots=True)
class Scenario:
    """How one answer behaves: seconds to the first chunk and between chunks, content
    chunks, and words (= tokens) per chunk."""

    ttft: float = 0.0
    chunks: int = 20
    delay: float = 0.0
    tokens_per_chunk: int = 1

    def for_model(self, model: str) -> Scenario:
        """The scenario ``model`` names, the fields it omits taken from ``self``; any
        name outside the grammar gets ``self`` unchanged."""
        if not model.startswith("mock"):
            return self
        parts = _SCENARIO_PART.findall(model, 4)
        if "".join(f"-{k}{v}" for k, v in parts) != model[4:]:
            return self
        values = dict(parts)
        return Scenario(
            ttft=float(values["ttft"]) / 1000 if "ttft" in values else self.ttft,
            chunks=int(float(values["chunks"])) if "chunks" in values else self.chunks,
            delay=float(values["delay"]) / 1000 if "delay" in values else self.delay,
            tokens_per_chunk=(int(float(values["tpc"])) if "tpc" in values
                              else self.tokens_per_chunk),
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete response: ``writes`` joined is the whole of it. ``first_wait`` seconds
    pass before the first write and ``delay`` between the later ones (loop timers have
    1 ms resolution under uvloop; writes keep to the schedule on average)."""

    writes: tuple[bytes, ...]
    first_wait: float = 0.0
    delay: float = 0.0

    @property
    def immediate(self) -> bool:
        return self.first_wait <= 0 and len(self.writes) == 1


def head(status: int, content_type: bytes, pid_header: bytes, length: int | None) -> bytes:
    """Status line and headers; ``length`` None means a chunked body."""
    framing = (b"transfer-encoding: chunked\r\ncache-control: no-cache" if length is None
               else b"content-length: " + str(length).encode())
    return b"".join((
        b"HTTP/1.1 ", str(status).encode(), b" ", _REASONS.get(status, "Error").encode(),
        b"\r\ncontent-type: ", content_type, b"\r\n", framing, b"\r\n", pid_header, b"\r\n",
    ))


def pid_header(pid: int) -> bytes:
    """Tells a test which process answered (``--processes N`` spreads connections)."""
    return b"x-mock-pid: " + str(pid).encode() + b"\r\n"


def whole_json(status: int, document: Any, pid: bytes, wait: float = 0.0) -> Reply:
    body = orjson.dumps(document)
    return Reply((head(status, _JSON, pid, len(body)) + body,), first_wait=wait)


def healthz(pid: bytes) -> Reply:
    return Reply((head(200, b"text/plain; charset=utf-8", pid, 3) + b"ok\n",))


def _chunk_frame(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def _stream(pid: bytes, scenario: Scenario, opening: Sequence[bytes],
            content: Sequence[bytes], closing: Sequence[bytes],
            content_type: bytes = _SSE) -> Reply:
    """Group SSE events into the writes of a paced stream (see the module docstring)."""
    groups = [[event] for event in content] or [[]]
    groups[0][:0] = opening
    groups[-1].extend(closing)
    writes = [_chunk_frame(b"".join(g)) for g in groups]
    writes[0] = head(200, content_type, pid, None) + writes[0]
    writes[-1] += _TERMINATOR
    if scenario.delay <= 0:  # nothing to pace after the first chunk: one write
        return Reply((b"".join(writes),), first_wait=scenario.ttft)
    return Reply(tuple(writes), first_wait=scenario.ttft, delay=scenario.delay)


def _generation_time(scenario: Scenario) -> float:
    """A non-stream answer arrives when a stream of the same scenario would have ended."""
    return scenario.ttft + max(0, scenario.chunks - 1) * scenario.delay


# --- OpenAI ----------------------------------------------------------------------------


def openai_error(status: int, message: str, pid: bytes, code: str | None = None) -> Reply:
    kind = "invalid_request_error"
    return whole_json(status, {"error": {"message": message, "type": kind, "param": None,
                                         "code": code}}, pid)


def openai_models(pid: bytes) -> Reply:
    data = [{"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "qnp-bench"}
            for name in ("mock", "mock-ttft200-chunks50-delay20")]
    return whole_json(200, {"object": "list", "data": data}, pid)


def _openai_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


def openai_chat(model: str, scenario: Scenario, prompt_tokens: int, stream: bool,
                include_usage: bool, pid: bytes) -> Reply:
    piece = _WORD * scenario.tokens_per_chunk
    usage = _openai_usage(prompt_tokens, scenario.chunks * scenario.tokens_per_chunk)
    ident = f"chatcmpl-{secrets.token_hex(12)}"
    created = int(time.time())
    if not stream:
        return whole_json(200, {
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": piece * scenario.chunks,
                                                 "refusal": None, "annotations": []},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": usage, "service_tier": "default", "system_fingerprint": _FINGERPRINT,
        }, pid, _generation_time(scenario))

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        doc: dict[str, Any] = {
            "id": ident, "object": "chat.completion.chunk", "created": created,
            "model": model, "service_tier": "default", "system_fingerprint": _FINGERPRINT,
            "choices": choices}
        if include_usage:
            doc["usage"] = None  # as OpenAI sends on every chunk but the last
        return b"data: " + orjson.dumps(doc | extra) + b"\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    opening = [event(choice({"role": "assistant", "content": "", "refusal": None}))]
    content = [event(choice({"content": piece}))] * scenario.chunks
    closing = [event(choice({}, "stop"))]
    if include_usage:
        closing.append(event([], usage=usage))
    closing.append(b"data: [DONE]\n\n")
    return _stream(pid, scenario, opening, content, closing)


# --- Anthropic -------------------------------------------------------------------------


def anthropic_error(status: int, message: str, pid: bytes) -> Reply:
    kind = _ANTHROPIC_ERROR.get(status, "api_error")
    return whole_json(status, {"type": "error", "error": {"type": kind, "message": message}},
                      pid)


def _anthropic_event(name: bytes, data: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_messages(model: str, scenario: Scenario, prompt_tokens: int, stream: bool,
                       pid: bytes) -> Reply:
    piece = _WORD * scenario.tokens_per_chunk
    output = scenario.chunks * scenario.tokens_per_chunk
    usage = {"input_tokens": prompt_tokens, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": 0, "output_tokens": output}
    message: dict[str, Any] = {
        "id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant",
        "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": usage | {"output_tokens": 1}}
    if not stream:
        done = message | {"content": [{"type": "text", "text": piece * scenario.chunks}],
                          "stop_reason": "end_turn", "usage": usage}
        return whole_json(200, done, pid, _generation_time(scenario))
    opening = [
        _anthropic_event(b"message_start", {"type": "message_start", "message": message}),
        _anthropic_event(b"content_block_start", {
            "type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        _anthropic_event(b"ping", {"type": "ping"}),
    ]
    content = [_anthropic_event(b"content_block_delta", {
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": piece}})] * scenario.chunks
    closing = [
        _anthropic_event(b"content_block_stop", {"type": "content_block_stop", "index": 0}),
        # Cumulative, as Anthropic sends it: the input side is repeated.
        _anthropic_event(b"message_delta", {
            "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": usage}),
        _anthropic_event(b"message_stop", {"type": "message_stop"}),
    ]
    return _stream(pid, scenario, opening, content, closing)


# --- Gemini ----------------------------------------------------------------------------


def gemini_error(status: int, message: str, pid: bytes) -> Reply:
    return whole_json(status, {"error": {"code": status, "message": message,
                                         "status": _GEMINI_STATUS.get(status, "UNKNOWN")}}, pid)


def gemini_generate(model: str, scenario: Scenario, prompt_tokens: int, stream: bool,
                    sse: bool, pid: bytes) -> Reply:
    """``generateContent`` (``stream`` False), ``streamGenerateContent?alt=sse``, or
    ``streamGenerateContent`` without ``alt=sse`` (a JSON array, sent whole)."""
    piece = _WORD * scenario.tokens_per_chunk
    total = scenario.chunks * scenario.tokens_per_chunk
    response_id = secrets.token_urlsafe(16)

    def doc(text: str, candidates: int, done: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"},
                                     "index": 0}
        if done:
            candidate["finishReason"] = "STOP"
        return {"candidates": [candidate],
                "usageMetadata": {"promptTokenCount": prompt_tokens,
                                  "candidatesTokenCount": candidates,
                                  "totalTokenCount": prompt_tokens + candidates},
                "modelVersion": model, "responseId": response_id}

    if not stream:
        return whole_json(200, doc(piece * scenario.chunks, total, True), pid,
                          _generation_time(scenario))
    n = scenario.chunks
    docs = [doc(piece, (i + 1) * scenario.tokens_per_chunk, i == n - 1) for i in range(n)]
    if not docs:
        docs = [doc("", 0, True)]
    if not sse:
        return whole_json(200, docs, pid, _generation_time(scenario))
    # Gemini ends its events with CRLF pairs and sends no [DONE].
    events = [b"data: " + orjson.dumps(d) + b"\r\n\r\n" for d in docs]
    return _stream(pid, scenario, (), events, (), content_type=b"text/event-stream")


# --- which reply answers a request ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class MockConfig:
    defaults: Scenario  # for fields a model name leaves out, and for other model names
    api_key: bytes | None


@dataclass(slots=True)
class Request:
    """One parsed HTTP request; ``credentials`` are the values of its key headers."""

    method: bytes
    url: bytes
    credentials: list[bytes]
    body: bytes
    keep_alive: bool


class Replies:
    """Routes a request to its reply, building each distinct reply once per process."""

    def __init__(self, config: MockConfig) -> None:
        self._config = config
        self._pid = pid_header(os.getpid())
        self._cache: dict[tuple[object, ...], Reply] = {}
        key = config.api_key or b""
        self._accepted = frozenset({key, b"Bearer " + key})  # header values that pass
        self._query_key = b"key=" + key

    def _cached(self, key: tuple[object, ...], build: Callable[[], Reply]) -> Reply:
        reply = self._cache.get(key)
        if reply is None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            reply = self._cache[key] = build()
        return reply

    def _error(self, provider: str, status: int, message: str) -> Reply:
        builders = {_OPENAI: openai_error, _ANTHROPIC: anthropic_error,
                    _GEMINI: gemini_error}
        return self._cached(("error", provider, status, message),
                            lambda: builders[provider](status, message, self._pid))

    def reply(self, request: Request) -> Reply:
        path, _, query = request.url.partition(b"?")
        provider = (_GEMINI if path.startswith(b"/v1beta/") else
                    _ANTHROPIC if path == b"/v1/messages" else _OPENAI)
        if path == b"/healthz":
            return self._cached(("healthz",), lambda: healthz(self._pid))
        if self._config.api_key is not None and not self._authorised(request, query):
            message = ("Incorrect API key provided." if provider == _OPENAI else
                       "invalid x-api-key" if provider == _ANTHROPIC else
                       "API key not valid. Please pass a valid API key.")
            return self._error(provider, 401, message)
        if request.method == b"GET" and path == b"/v1/models":
            return self._cached(("models",), lambda: openai_models(self._pid))
        if request.method != b"POST":
            return self._error(provider, 404, f"Invalid URL ({request.method.decode()} "
                                              f"{path.decode(errors='replace')})")
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return self._error(provider, 400, "We could not parse the JSON body of your request.")
        prompt_tokens = max(1, len(request.body) // 4)
        if path == b"/v1/chat/completions":
            return self._openai(body, prompt_tokens)
        if path == b"/v1/messages":
            return self._anthropic(body, prompt_tokens)
        if path.startswith(b"/v1beta/models/"):
            return self._gemini(path[len(b"/v1beta/models/"):].decode(errors="replace"),
                                b"alt=sse" in query.split(b"&"), prompt_tokens)
        return self._error(provider, 404, f"Invalid URL (POST {path.decode(errors='replace')})")

    def _authorised(self, request: Request, query: bytes) -> bool:
        if any(value in self._accepted for value in request.credentials):
            return True
        return bool(query) and self._query_key in query.split(b"&")

    def _openai(self, body: dict[str, object], prompt_tokens: int) -> Reply:
        model = body.get("model")
        if not isinstance(model, str):
            return self._error(_OPENAI, 400, "you must provide a model parameter")
        stream = body.get("stream") is True
        options = body.get("stream_options")
        usage = stream and isinstance(options, dict) and options.get("include_usage") is True
        return self._cached(
            (_OPENAI, model, stream, usage, prompt_tokens),
            lambda: openai_chat(model, self._config.defaults.for_model(model),
                                          prompt_tokens, stream, usage, self._pid))

    def _anthropic(self, body: dict[str, object], prompt_tokens: int) -> Reply:
        model = body.get("model")
        if not isinstance(model, str):
            return self._error(_ANTHROPIC, 400, "model: Field required")
        stream = body.get("stream") is True
        return self._cached(
            (_ANTHROPIC, model, stream, prompt_tokens),
            lambda: anthropic_messages(model, self._config.defaults.for_model(model),
                                                 prompt_tokens, stream, self._pid))

    def _gemini(self, call: str, sse: bool, prompt_tokens: int) -> Reply:
        model, _, action = call.partition(":")
        if action not in ("generateContent", "streamGenerateContent"):
            return self._error(_GEMINI, 404, f"Method {action} not found.")
        stream = action == "streamGenerateContent"
        return self._cached(
            (_GEMINI, model, stream, sse, prompt_tokens),
            lambda: gemini_generate(model, self._config.defaults.for_model(model),
                                              prompt_tokens, stream, sse, self._pid))
