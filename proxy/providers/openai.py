"""OpenAI's chat-completions wire (and the legacy completions and embeddings bodies).

Parsing validates what we must understand and keeps the client's payload for
pass-through to OpenAI-compatible upstreams; translation to and from the neutral form
covers text, images (URL or base64), tools and tool calls, system prompts and stop
reasons. Usage: the final usage chunk (``choices`` empty or null, or riding on a
content chunk), with cached and reasoning token details.

Must not import the handlers, the catalog or the upstream client.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from proxy.errors import BadRequest, ProxyError, UpstreamRefused
from proxy.openai_wire import StreamScanner, usage_from
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
    fallbacks,
    json_object_or_none,
    optional_float,
    optional_int,
    request_object,
    split_data_url,
)

_DONE = b"data: [DONE]\n\n"
_PATHS = {"chat": "/chat/completions", "completions": "/completions",
          "embeddings": "/embeddings"}
# Client-only fields that an upstream would reject or misread.
_GATEWAY_FIELDS = ("models", "route", "provider")


def _model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", param="model")
    return model


def _text_of(content: object, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise BadRequest(f"'{where}' must be a string or an array of parts.", param=where)


def _user_parts(content: object, where: str) -> list[Part]:
    if isinstance(content, str):
        return [Part("text", text=content)]
    if not isinstance(content, list):
        raise BadRequest(f"'{where}' must be a string or an array of parts.", param=where)
    parts: list[Part] = []
    for i, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            parts.append(Part("text", text=item["text"]))
        elif kind == "image_url":
            image = item.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise BadRequest(f"'{where}[{i}].image_url.url' must be a URL.",
                                 param=f"{where}[{i}].image_url")
            inline = split_data_url(url)
            parts.append(Part("image", media_type=inline[0], data=inline[1]) if inline
                         else Part("image", url=url))
        else:
            raise BadRequest(f"'{where}[{i}]' is not a supported content part.",
                             param=f"{where}[{i}]")
    return parts


def _tool_calls(calls: object, where: str) -> list[Part]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise BadRequest(f"'{where}' must be an array.", param=where)
    parts = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"'{where}[{i}].function' must name a function.",
                             param=f"{where}[{i}]")
        args = fn.get("arguments")
        parts.append(Part("tool_call", call_id=str(call.get("id") or ""), name=fn["name"],
                          arguments=args if isinstance(args, str) and args else "{}"))
    return parts


def _messages(raw: object) -> tuple[str | None, list[Message]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty array.", param="messages")
    system: list[str] = []
    messages: list[Message] = []
    names: dict[str, str] = {}  # tool call id → function name (Gemini needs the name)
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"'{where}' must be an object.", param=where)
        role, content = m.get("role"), m.get("content")
        if role in ("system", "developer"):
            system.append(_text_of(content, f"{where}.content"))
        elif role == "user":
            messages.append(Message("user", _user_parts(content, f"{where}.content")))
        elif role == "assistant":
            text = _text_of(content, f"{where}.content")
            calls = _tool_calls(m.get("tool_calls"), f"{where}.tool_calls")
            names.update((c.call_id, c.name) for c in calls)
            parts = ([Part("text", text=text)] if text else []) + calls
            messages.append(Message("assistant", parts))
        elif role in ("tool", "function"):
            call_id = str(m.get("tool_call_id") or m.get("name") or "")
            result = Part("tool_result", text=_text_of(content, f"{where}.content"),
                          call_id=call_id, name=names.get(call_id, str(m.get("name") or "")))
            if messages and messages[-1].role == "user" and \
                    all(p.kind == "tool_result" for p in messages[-1].parts):
                messages[-1].parts.append(result)
            else:
                messages.append(Message("user", [result]))
        else:
            raise BadRequest(f"'{where}.role' must be system, developer, user, assistant "
                             "or tool.", param=f"{where}.role")
    return ("\n\n".join(system) if system else None), messages


def _tools(raw: object) -> list[Tool]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("'tools' must be an array.", param="tools")
    tools = []
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRequest(f"'tools[{i}].function.name' is required.", param=f"tools[{i}]")
        params = fn.get("parameters")
        tools.append(Tool(fn["name"], str(fn.get("description") or ""),
                          params if isinstance(params, dict) else {"type": "object"}))
    return tools


def _tool_choice(raw: object) -> tuple[str | None, str | None]:
    if raw is None or raw in ("auto", "none", "required"):
        return (raw if isinstance(raw, str) else None), None
    fn = raw.get("function") if isinstance(raw, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return "tool", fn["name"]
    raise BadRequest("'tool_choice' must be auto, none, required or name a function.",
                     param="tool_choice")


def _stop(raw: object) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        return list(raw)
    raise BadRequest("'stop' must be a string or an array of strings.", param="stop")


_FINISH_TO_NEUTRAL = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
                      "function_call": "tool_calls", "content_filter": "content_filter"}


def _usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def _to_messages(chat: Chat) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if chat.system:
        messages.append({"role": "system", "content": chat.system})
    for m in chat.messages:
        messages.extend({"role": "tool", "tool_call_id": p.call_id, "content": p.text}
                        for p in m.parts if p.kind == "tool_result")
        content: list[dict[str, Any]] = []
        for p in m.parts:
            if p.kind == "text":
                content.append({"type": "text", "text": p.text})
            elif p.kind == "image":
                url = p.url or f"data:{p.media_type};base64,{p.data}"
                content.append({"type": "image_url", "image_url": {"url": url}})
        calls = [p for p in m.parts if p.kind == "tool_call"]
        if m.role == "assistant":
            msg: dict[str, Any] = {
                "role": "assistant",
                "content": "".join(c.get("text", "") for c in content) or None}
            if calls:
                msg["tool_calls"] = [{"id": c.call_id, "type": "function", "function": {
                    "name": c.name, "arguments": c.arguments}} for c in calls]
            messages.append(msg)
        elif content:
            messages.append({"role": "user", "content": content})
    return messages


class _Scanner(Relay):
    """Pass-through: the spine's scanner (bytes untouched, usage chunk cut if unasked)."""

    def __init__(self, wants_usage: bool) -> None:
        self._scan = StreamScanner(forward_usage=wants_usage)

    def feed(self, data: bytes) -> bytes:
        out = self._scan.feed(data)
        self.usage = self._scan.usage
        return out

    def finish(self) -> bytes:
        return self._scan.finish()

    def estimated_completion_tokens(self) -> int:
        return self._scan.events


class _Decoder(Decoder):
    def __init__(self) -> None:
        super().__init__()
        self._started = False

    def read(self, doc: dict[str, Any]) -> list[Delta]:
        if isinstance(doc.get("error"), dict):
            return [Failure(502, str(doc["error"].get("message") or "upstream error"))]
        out: list[Delta] = []
        if not self._started:
            self._started = True
            out.append(Start(str(doc.get("id") or ""), str(doc.get("model") or "")))
        usage = usage_from(doc.get("usage"))
        if usage is not None:
            self.usage = usage
        for choice in doc.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                out.append(Text(delta["content"]))
            for call in delta.get("tool_calls") or ():
                index = int(call.get("index", 0))
                fn = call.get("function") or {}
                if call.get("id") or fn.get("name"):
                    out.append(ToolStart(index, str(call.get("id") or ""),
                                         str(fn.get("name") or "")))
                if fn.get("arguments"):
                    out.append(ToolArgs(index, fn["arguments"]))
            if choice.get("finish_reason"):
                out.append(Stop(_FINISH_TO_NEUTRAL.get(choice["finish_reason"], "stop")))
        return out


class _Encoder(Encoder):
    def __init__(self, chat: Chat) -> None:
        self._model = chat.model
        self._wants_usage = chat.wants_usage
        self._id = f"chatcmpl-{secrets.token_hex(12)}"
        self._created = int(time.time())
        self._started = False
        self._stopped: str | None = None

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        doc = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
               "model": self._model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def encode(self, deltas: list[Delta]) -> bytes:
        out = []
        for d in deltas:
            if not self._started and not isinstance(d, Failure):
                self._started = True
                out.append(self._chunk({"role": "assistant", "content": ""}))
            if isinstance(d, Text):
                out.append(self._chunk({"content": d.text}))
            elif isinstance(d, ToolStart):
                out.append(self._chunk({"tool_calls": [{
                    "index": d.index, "id": d.call_id, "type": "function",
                    "function": {"name": d.name, "arguments": ""}}]}))
            elif isinstance(d, ToolArgs):
                out.append(self._chunk({"tool_calls": [{
                    "index": d.index, "function": {"arguments": d.json}}]}))
            elif isinstance(d, Stop):
                self._stopped = d.reason
            elif isinstance(d, Failure):
                out.append(b"data: " + orjson.dumps({"error": {
                    "message": d.message, "type": "upstream_error", "param": None,
                    "code": "upstream_error"}}) + b"\n\n")
        return b"".join(out)

    def finish(self, usage: Usage | None) -> bytes:
        out = []
        if self._stopped is not None:
            out.append(self._chunk({}, self._stopped))
            if self._wants_usage and usage is not None:
                doc = {"id": self._id, "object": "chat.completion.chunk",
                       "created": self._created, "model": self._model, "choices": [],
                       "usage": _usage_json(usage)}
                out.append(b"data: " + orjson.dumps(doc) + b"\n\n")
            out.append(_DONE)
        return b"".join(out)


class OpenAIWire(Wire):
    kind = "openai"

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def parse(self, body: bytes, *, model: str | None = None,
              stream: bool | None = None) -> Chat:
        payload = request_object(body)
        name = _model(payload)
        system, messages = _messages(payload.get("messages"))
        is_stream = payload.get("stream", False)
        if not isinstance(is_stream, bool):
            raise BadRequest("'stream' must be a boolean.", param="stream")
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object.", param="stream_options")
        choice, choice_name = _tool_choice(payload.get("tool_choice"))
        max_tokens = optional_int(payload, "max_completion_tokens")
        return Chat(
            model=name, stream=is_stream, messages=messages, payload=payload, system=system,
            max_tokens=max_tokens if max_tokens is not None
            else optional_int(payload, "max_tokens"),
            temperature=optional_float(payload, "temperature"),
            top_p=optional_float(payload, "top_p"), stop=_stop(payload.get("stop")),
            tools=_tools(payload.get("tools")), tool_choice=choice,
            tool_choice_name=choice_name, fallbacks=fallbacks(payload, name),
            wants_usage=bool(options and options.get("include_usage") is True),
        )

    def parse_operation(self, body: bytes, operation: str) -> Chat:
        """``/v1/embeddings`` and legacy ``/v1/completions``: validated and passed through."""
        payload = request_object(body)
        name = _model(payload)
        field = "input" if operation == "embeddings" else "prompt"
        value = payload.get(field)
        if not isinstance(value, str | list) or not value:
            raise BadRequest(f"'{field}' must be a non-empty string or array.", param=field)
        is_stream = payload.get("stream", False) if operation == "completions" else False
        if not isinstance(is_stream, bool):
            raise BadRequest("'stream' must be a boolean.", param="stream")
        options = payload.get("stream_options")
        text = value if isinstance(value, str) else client_json(value).decode()
        return Chat(model=name, stream=is_stream, payload=payload, operation=operation,
                    messages=[Message("user", [Part("text", text=text)])],
                    max_tokens=optional_int(payload, "max_tokens"),
                    fallbacks=fallbacks(payload, name),
                    wants_usage=bool(isinstance(options, dict)
                                     and options.get("include_usage") is True))

    def request(self, chat: Chat, target: Target, *, same_format: bool) -> UpstreamRequest:
        url = target.base_url + _PATHS[chat.operation]
        if same_format:
            payload = {k: v for k, v in chat.payload.items() if k not in _GATEWAY_FIELDS}
            payload["model"] = target.upstream_model
            if chat.stream:
                options = payload.get("stream_options") or {}
                payload["stream_options"] = {**options, "include_usage": True}
            return UpstreamRequest(url, target.headers, client_json(payload))
        return UpstreamRequest(url, target.headers, client_json(self._build(chat, target)))

    @staticmethod
    def _build(chat: Chat, target: Target) -> dict[str, Any]:
        body: dict[str, Any] = {"model": target.upstream_model, "messages": _to_messages(chat)}
        if chat.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        for name, value in (("max_tokens", chat.max_tokens), ("temperature", chat.temperature),
                            ("top_p", chat.top_p), ("stop", chat.stop or None)):
            if value is not None:
                body[name] = value
        if chat.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": dict(t.parameters)}}
                for t in chat.tools]
        if chat.tool_choice == "tool":
            body["tool_choice"] = {"type": "function", "function": {"name": chat.tool_choice_name}}
        elif chat.tool_choice is not None:
            body["tool_choice"] = chat.tool_choice
        return body

    def reply_usage(self, body: bytes) -> Usage | None:
        doc = json_object_or_none(body)
        return usage_from(doc.get("usage")) if doc is not None else None

    def decode_reply(self, body: bytes) -> Reply:
        doc = orjson.loads(body)
        choice = (doc.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        calls = _tool_calls(message.get("tool_calls"), "tool_calls")
        return Reply(
            id=str(doc.get("id") or ""), model=str(doc.get("model") or ""),
            text=_text_of(message.get("content"), "content"), tool_calls=calls,
            stop=_FINISH_TO_NEUTRAL.get(choice.get("finish_reason") or "stop", "stop"),
            usage=usage_from(doc.get("usage")),
        )

    def encode_reply(self, reply: Reply, model: str) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or None,
                                   "refusal": None}
        if reply.tool_calls:
            message["tool_calls"] = [{"id": c.call_id, "type": "function", "function": {
                "name": c.name, "arguments": c.arguments}} for c in reply.tool_calls]
        doc: dict[str, Any] = {
            "id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": reply.stop}],
        }
        if reply.usage is not None:
            doc["usage"] = _usage_json(reply.usage)
        return orjson.dumps(doc)

    def scanner(self, chat: Chat) -> Relay:
        return _Scanner(chat.wants_usage)

    def decoder(self) -> Decoder:
        return _Decoder()

    def encoder(self, chat: Chat) -> Encoder:
        return _Encoder(chat)

    def error_body(self, err: ProxyError) -> bytes:
        if isinstance(err, UpstreamRefused):  # the upstream spoke this same format
            return err.upstream_body
        return err.body()

    def stream_error(self, err: ProxyError) -> bytes:
        return b"data: " + err.body() + b"\n\n"

