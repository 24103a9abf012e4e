"""Anthropic's Messages wire (``POST /v1/messages``).

Usage: ``message_start`` carries the input side (input, cache creation and cache read
tokens, kept apart) and a first output count; every ``message_delta`` carries
*cumulative* usage, so the last value of each field wins and nothing is summed.
``ping`` events pass through; an ``error`` event mid-stream marks the stream failed.

Must not import the handlers, the catalog or the upstream client.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from proxy.errors import BadRequest, ProxyError, UpstreamRefused
from proxy.providers.base import (
    Chat,
    Decoder,
    Delta,
    Encoder,
    Failure,
    Message,
    Part,
    Relay,
    Reply,
    Start,
    Stop,
    Target,
    Text,
    Tool,
    ToolArgs,
    ToolStart,
    UpstreamRequest,
    Usage,
    Wire,
    client_json,
    client_json_value,
    fallbacks,
    json_object_or_none,
    optional_float,
    optional_int,
    positive_int,
    request_object,
)
from proxy.providers.sse import SSEBuffer, sse

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; other formats may omit it
_STOP_TO_NEUTRAL = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                    "tool_use": "tool_calls", "refusal": "content_filter",
                    "pause_turn": "stop"}
_NEUTRAL_TO_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                    "content_filter": "refusal"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                402: "billing_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error",
                529: "overloaded_error"}
_GATEWAY_FIELDS = ("models",)


def _error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _error_doc(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _error_type(status), "message": message}}


def usage_from(doc: object, base: Usage | None = None) -> Usage | None:
    """Usage from an Anthropic ``usage`` object; fields it lacks keep ``base``'s values."""
    if not isinstance(doc, dict):
        return base
    base = base or Usage()
    raw_input = base.prompt_tokens - base.cached_tokens - base.cache_write_tokens

    def pick(name: str, old: int) -> int:
        return positive_int(doc[name]) if doc.get(name) is not None else old

    plain = pick("input_tokens", raw_input)
    read = pick("cache_read_input_tokens", base.cached_tokens)
    write = pick("cache_creation_input_tokens", base.cache_write_tokens)
    return Usage(prompt_tokens=plain + read + write,
                 completion_tokens=pick("output_tokens", base.completion_tokens),
                 cached_tokens=read, cache_write_tokens=write)


def _usage_json(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens,
            "cache_creation_input_tokens": usage.cache_write_tokens,
            "cache_read_input_tokens": usage.cached_tokens,
            "output_tokens": usage.completion_tokens}


def _text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content
                       if isinstance(b, dict) and isinstance(b.get("text"), str))
    if content is None:
        return ""
    raise BadRequest(f"{where}: must be a string or an array of content blocks.")


def _block(block: object, where: str) -> Part | None:
    kind = block.get("type") if isinstance(block, dict) else None
    if not isinstance(block, dict) or not isinstance(kind, str):
        raise BadRequest(f"{where}: each content block must be an object with a 'type'.")
    if kind == "text":
        return Part("text", text=_text(block.get("text"), where))
    if kind == "image":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "base64":
            return Part("image", media_type=str(source.get("media_type")),
                        data=str(source.get("data")))
        if isinstance(source, dict) and source.get("type") == "url":
            return Part("image", url=str(source.get("url")))
        raise BadRequest(f"{where}.source: must be a base64 or url image source.")
    if kind == "tool_use":
        return Part("tool_call", call_id=str(block.get("id") or ""),
                    name=str(block.get("name") or ""),
                    arguments=client_json(block.get("input") or {}).decode())
    if kind == "tool_result":
        return Part("tool_result", call_id=str(block.get("tool_use_id") or ""),
                    text=_text(block.get("content"), f"{where}.content"),
                    is_error=bool(block.get("is_error")))
    if kind in ("thinking", "redacted_thinking"):
        return None  # the model's own reasoning: only Anthropic upstreams take it back
    raise BadRequest(f"{where}: unsupported content block type.")


def _messages(raw: object) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: must be a non-empty array.")
    out: list[Message] = []
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"{where}.role: must be 'user' or 'assistant'.")
        content = m.get("content")
        if isinstance(content, str):
            parts = [Part("text", text=content)]
        elif isinstance(content, list):
            parts = [p for j, b in enumerate(content)
                     if (p := _block(b, f"{where}.content.{j}")) is not None]
        else:
            raise BadRequest(f"{where}.content: must be a string or an array.")
        out.append(Message(m["role"], parts))
    names = {p.call_id: p.name for m in out for p in m.parts if p.kind == "tool_call"}
    for m in out:
        for p in m.parts:
            if p.kind == "tool_result":
                p.name = names.get(p.call_id, "")
    return out


def _tools(raw: object) -> list[Tool]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("tools: must be an array.")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise BadRequest(f"tools.{i}.name: Field required")
        schema = t.get("input_schema")
        tools.append(Tool(t["name"], str(t.get("description") or ""),
                          schema if isinstance(schema, dict) else {"type": "object"}))
    return tools


def _to_block(p: Part) -> dict[str, Any] | None:
    if p.kind == "text":
        return {"type": "text", "text": p.text} if p.text else None
    if p.kind == "image":
        source = {"type": "url", "url": p.url} if p.url else {
            "type": "base64", "media_type": p.media_type, "data": p.data}
        return {"type": "image", "source": source}
    if p.kind == "tool_call":
        return {"type": "tool_use", "id": p.call_id, "name": p.name,
                "input": client_json_value(p.arguments, "A tool call's arguments")}
    if p.kind == "tool_result":
        return {"type": "tool_result", "tool_use_id": p.call_id, "content": p.text,
                "is_error": p.is_error}
    return None


class _Scanner(Relay):
    """Pass-through for an Anthropic stream to an Anthropic client: bytes untouched."""

    def __init__(self) -> None:
        self._sse = SSEBuffer()
        self._deltas = 0

    def feed(self, data: bytes) -> bytes:
        for event in self._sse.feed(data):
            name = event.name
            if name == b"content_block_delta":
                self._deltas += 1
            elif name in (b"message_start", b"message_delta"):
                doc = event.json()
                if isinstance(doc, dict):
                    holder = doc.get("message") if name == b"message_start" else doc
                    if isinstance(holder, dict):
                        self.usage = usage_from(holder.get("usage"), self.usage)
            elif name == b"error":
                self.failed = True
        return data

    def finish(self) -> bytes:
        self._sse.rest()
        return b""

    def estimated_completion_tokens(self) -> int:
        return self._deltas


class _Decoder(Decoder):
    def __init__(self) -> None:
        super().__init__()
        self._tools: dict[int, int] = {}  # content block index → tool call ordinal

    def read(self, doc: dict[str, Any]) -> list[Delta]:
        kind = doc.get("type")
        if kind == "message_start" and isinstance(doc.get("message"), dict):
            message = doc["message"]
            self.usage = usage_from(message.get("usage"), self.usage)
            return [Start(str(message.get("id") or ""), str(message.get("model") or ""))]
        if kind == "content_block_start":
            block = doc.get("content_block") or {}
            if block.get("type") == "tool_use":
                ordinal = self._tools[int(doc.get("index", 0))] = len(self._tools)
                return [ToolStart(ordinal, str(block.get("id") or ""),
                                  str(block.get("name") or ""))]
            if block.get("type") == "text" and block.get("text"):
                return [Text(block["text"])]
        elif kind == "content_block_delta":
            delta = doc.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [Text(delta["text"])]
            if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                ordinal = self._tools.get(int(doc.get("index", 0)), 0)
                return [ToolArgs(ordinal, delta["partial_json"])]
        elif kind == "message_delta":
            self.usage = usage_from(doc.get("usage"), self.usage)
            reason = (doc.get("delta") or {}).get("stop_reason")
            if reason:
                return [Stop(_STOP_TO_NEUTRAL.get(reason, "stop"))]
        elif kind == "error":
            error = doc.get("error") or {}
            status = 529 if error.get("type") == "overloaded_error" else 502
            return [Failure(status, str(error.get("message") or "upstream error"))]
        return []


class _Encoder(Encoder):
    def __init__(self, chat: Chat) -> None:
        self._model = chat.model
        self._started = False
        self._index = -1
        self._open: str | None = None  # "text" | "tool"
        self._stop: str | None = None

    def _start(self) -> list[bytes]:
        self._started = True
        message: dict[str, Any] = {"id": f"msg_{secrets.token_hex(12)}", "type": "message",
                   "role": "assistant", "content": [], "model": self._model,
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return [sse({"type": "message_start", "message": message}, "message_start")]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [sse({"type": "content_block_stop", "index": self._index},
                    "content_block_stop")]

    def _begin(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self._index += 1
        self._open = kind
        out.append(sse({"type": "content_block_start", "index": self._index,
                        "content_block": block}, "content_block_start"))
        return out

    def encode(self, deltas: list[Delta]) -> bytes:
        out: list[bytes] = []
        for d in deltas:
            if not self._started and not isinstance(d, Failure):
                out += self._start()
            if isinstance(d, Text):
                if self._open != "text":
                    out += self._begin("text", {"type": "text", "text": ""})
                out.append(sse({"type": "content_block_delta", "index": self._index,
                                "delta": {"type": "text_delta", "text": d.text}},
                               "content_block_delta"))
            elif isinstance(d, ToolStart):
                out += self._begin("tool", {"type": "tool_use", "id": d.call_id,
                                            "name": d.name, "input": {}})
            elif isinstance(d, ToolArgs):
                out.append(sse({"type": "content_block_delta", "index": self._index,
                                "delta": {"type": "input_json_delta", "partial_json": d.json}},
                               "content_block_delta"))
            elif isinstance(d, Stop):
                self._stop = d.reason
            elif isinstance(d, Failure):
                out.append(sse(_error_doc(d.status, d.message), "error"))
        return b"".join(out)

    def finish(self, usage: Usage | None) -> bytes:
        if self._stop is None:
            return b""
        out = self._close()
        delta: dict[str, Any] = {"type": "message_delta", "delta": {
            "stop_reason": _NEUTRAL_TO_STOP.get(self._stop, "end_turn"), "stop_sequence": None},
            "usage": _usage_json(usage or Usage())}
        out.append(sse(delta, "message_delta"))
        out.append(sse({"type": "message_stop"}, "message_stop"))
        return b"".join(out)


class AnthropicWire(Wire):
    kind = "anthropic"

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"x-api-key": key, "anthropic-version": API_VERSION}

    def parse(self, body: bytes, *, model: str | None = None,
              stream: bool | None = None) -> Chat:
        payload = request_object(body)
        name = payload.get("model")
        if not isinstance(name, str) or not name:
            raise BadRequest("model: Field required", param="model")
        max_tokens = optional_int(payload, "max_tokens")
        if max_tokens is None:
            raise BadRequest("max_tokens: Field required", param="max_tokens")
        is_stream = payload.get("stream", False)
        if not isinstance(is_stream, bool):
            raise BadRequest("stream: Input should be a valid boolean", param="stream")
        system = payload.get("system")
        stop = payload.get("stop_sequences") or []
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop_sequences: must be an array of strings.")
        choice = payload.get("tool_choice") or {}
        kind = choice.get("type") if isinstance(choice, dict) else None
        return Chat(
            model=name, stream=is_stream, messages=_messages(payload.get("messages")),
            payload=payload, system=_text(system, "system") if system is not None else None,
            max_tokens=max_tokens, temperature=optional_float(payload, "temperature"),
            top_p=optional_float(payload, "top_p"), stop=stop,
            tools=_tools(payload.get("tools")),
            tool_choice={"auto": "auto", "any": "required", "none": "none",
                         "tool": "tool"}.get(kind or ""),
            tool_choice_name=choice.get("name") if kind == "tool" else None,
            fallbacks=fallbacks(payload, name), wants_usage=True,
        )

    def request(self, chat: Chat, target: Target, *, same_format: bool) -> UpstreamRequest:
        url = target.base_url + "/messages"
        if same_format:
            payload = {k: v for k, v in chat.payload.items() if k not in _GATEWAY_FIELDS}
            payload["model"] = target.upstream_model
            return UpstreamRequest(url, target.headers, client_json(payload))
        return UpstreamRequest(url, target.headers, client_json(self._build(chat, target)))

    @staticmethod
    def _build(chat: Chat, target: Target) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        for m in chat.messages:
            blocks = [b for p in m.parts if (b := _to_block(p)) is not None]
            if not blocks:
                continue
            if messages and messages[-1]["role"] == m.role:  # roles must alternate
                messages[-1]["content"].extend(blocks)
            else:
                messages.append({"role": m.role, "content": blocks})
        body: dict[str, Any] = {"model": target.upstream_model, "messages": messages,
                                "max_tokens": chat.max_tokens or DEFAULT_MAX_TOKENS}
        if chat.system:
            body["system"] = chat.system
        if chat.stream:
            body["stream"] = True
        for name in ("temperature", "top_p"):
            if getattr(chat, name) is not None:
                body[name] = getattr(chat, name)
        if chat.stop:
            body["stop_sequences"] = chat.stop
        if chat.tools:
            body["tools"] = [{"name": t.name, "description": t.description,
                              "input_schema": dict(t.parameters)} for t in chat.tools]
        if chat.tool_choice is not None:
            choice: dict[str, Any] = {"type": {"auto": "auto", "required": "any", "none": "none",
                                               "tool": "tool"}[chat.tool_choice]}
            if chat.tool_choice == "tool":
                choice["name"] = chat.tool_choice_name
            body["tool_choice"] = choice
        return body

    def reply_usage(self, body: bytes) -> Usage | None:
        doc = json_object_or_none(body)
        return usage_from(doc.get("usage")) if doc is not None else None

    def decode_reply(self, body: bytes) -> Reply:
        doc = orjson.loads(body)
        text, calls = [], []
        for block in doc.get("content") or ():
            if block.get("type") == "text":
                text.append(str(block.get("text") or ""))
            elif block.get("type") == "tool_use":
                calls.append(Part("tool_call", call_id=str(block.get("id") or ""),
                                  name=str(block.get("name") or ""),
                                  arguments=orjson.dumps(block.get("input") or {}).decode()))
        return Reply(id=str(doc.get("id") or ""), model=str(doc.get("model") or ""),
                     text="".join(text), tool_calls=calls,
                     stop=_STOP_TO_NEUTRAL.get(doc.get("stop_reason") or "end_turn", "stop"),
                     usage=usage_from(doc.get("usage")))

    def encode_reply(self, reply: Reply, model: str) -> bytes:
        content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] \
            if reply.text or not reply.tool_calls else []
        content += [{"type": "tool_use", "id": c.call_id, "name": c.name,
                     "input": orjson.loads(c.arguments or "{}")} for c in reply.tool_calls]
        return orjson.dumps({
            "id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant",
            "model": model, "content": content,
            "stop_reason": _NEUTRAL_TO_STOP.get(reply.stop, "end_turn"),
            "stop_sequence": None, "usage": _usage_json(reply.usage or Usage()),
        })

    def scanner(self, chat: Chat) -> Relay:
        return _Scanner()

    def decoder(self) -> Decoder:
        return _Decoder()

    def encoder(self, chat: Chat) -> Encoder:
        return _Encoder(chat)

    def error_body(self, err: ProxyError) -> bytes:
        if isinstance(err, UpstreamRefused):  # the upstream spoke this same format
            return err.upstream_body
        return orjson.dumps(_error_doc(err.status, err.message))

    def stream_error(self, err: ProxyError) -> bytes:
        return sse(_error_doc(err.status, err.message), "error")

