"""Google Gemini's wire (``models/{model}:generateContent`` and
``:streamGenerateContent?alt=sse``).

The model and whether to stream come from the URL, not the body. Every stream chunk is
a whole ``GenerateContentResponse``; ``usageMetadata`` rides on chunks with the totals
on the final one (the last one seen wins). ``promptTokenCount`` includes
``cachedContentTokenCount``; ``thoughtsTokenCount`` is billed as output but is not part
of ``candidatesTokenCount``, so completion = candidates + thoughts here.

Must not import the handlers, the catalog or the upstream client.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.errors import BadRequest, ProxyError, UpstreamRefused
from proxy.providers.base import (
    MAX_JSON_DEPTH,
    Chat,
    Decoder,
    Delta,
    Encoder,
    Failure,
    Message,
    NestedTooDeep,
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
    positive_int,
    request_object,
)
from proxy.providers.sse import SSEBuffer

_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "FAILED_PRECONDITION",
                 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
                 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_FINISH_TO_NEUTRAL = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter",
                      "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
                      "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter"}
_NEUTRAL_TO_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP",
                      "content_filter": "SAFETY"}
# JSON Schema keywords Gemini's OpenAPI-subset ``parameters`` refuses.
_UNSUPPORTED_SCHEMA = frozenset({"$schema", "additionalProperties", "strict", "$id"})
_SEP = b"\r\n\r\n"  # what Google's servers end each SSE event with


def _error_doc(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message,
                      "status": _STATUS_NAMES.get(status, "INTERNAL" if status >= 500
                                                  else "INVALID_ARGUMENT")}}


def usage_from(doc: object) -> Usage | None:
    if not isinstance(doc, dict):
        return None
    thoughts = positive_int(doc.get("thoughtsTokenCount"))
    return Usage(
        prompt_tokens=positive_int(doc.get("promptTokenCount"))
        + positive_int(doc.get("toolUsePromptTokenCount")),
        completion_tokens=positive_int(doc.get("candidatesTokenCount")) + thoughts,
        cached_tokens=positive_int(doc.get("cachedContentTokenCount")),
        reasoning_tokens=thoughts,
    )


def _usage_json(usage: Usage) -> dict[str, int]:
    return {"promptTokenCount": usage.prompt_tokens,
            "candidatesTokenCount": usage.completion_tokens - usage.reasoning_tokens,
            "totalTokenCount": usage.prompt_tokens + usage.completion_tokens,
            "cachedContentTokenCount": usage.cached_tokens,
            "thoughtsTokenCount": usage.reasoning_tokens}


def _schema(value: Any, depth: int = 1) -> Any:
    """A client's tool schema without the keys Gemini refuses. Deeper than orjson can
    write, it could not be sent anyway: stopping there keeps the recursion (two frames
    a level) well inside Python's limit."""
    if isinstance(value, Mapping | list) and depth > MAX_JSON_DEPTH:
        raise NestedTooDeep()
    if isinstance(value, Mapping):
        return {k: _schema(v, depth + 1) for k, v in value.items()
                if k not in _UNSUPPORTED_SCHEMA}
    if isinstance(value, list):
        return [_schema(v, depth + 1) for v in value]
    return value


def _parts(raw: object, where: str, calls: list[Part]) -> list[Part]:
    if not isinstance(raw, list):
        raise BadRequest(f"Invalid value at '{where}': must be an array of parts.")
    parts: list[Part] = []
    for i, p in enumerate(raw):
        if not isinstance(p, dict):
            raise BadRequest(f"Invalid value at '{where}[{i}]': must be an object.")
        if p.get("thought"):
            continue
        if isinstance(p.get("text"), str):
            parts.append(Part("text", text=p["text"]))
        elif isinstance(p.get("inlineData"), dict):
            parts.append(Part("image", media_type=str(p["inlineData"].get("mimeType")),
                              data=str(p["inlineData"].get("data"))))
        elif isinstance(p.get("fileData"), dict):
            parts.append(Part("image", url=str(p["fileData"].get("fileUri")),
                              media_type=p["fileData"].get("mimeType")))
        elif isinstance(p.get("functionCall"), dict):
            fn = p["functionCall"]
            call = Part("tool_call", call_id=str(fn.get("id") or f"call_{len(calls)}"),
                        name=str(fn.get("name") or ""),
                        arguments=client_json(fn.get("args") or {}).decode())
            calls.append(call)
            parts.append(call)
        elif isinstance(p.get("functionResponse"), dict):
            fn = p["functionResponse"]
            name = str(fn.get("name") or "")
            call_id = fn.get("id") or next(
                (c.call_id for c in reversed(calls) if c.name == name), name)
            response = fn.get("response")
            parts.append(Part("tool_result", call_id=str(call_id), name=name,
                              text=client_json(response).decode() if response else ""))
        else:
            raise BadRequest(f"Invalid value at '{where}[{i}]': unsupported part.")
    return parts


def _messages(raw: object) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("* GenerateContentRequest.contents: contents is not specified")
    calls: list[Part] = []
    out = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise BadRequest(f"Invalid value at 'contents[{i}]': must be an object.")
        role = "assistant" if c.get("role") == "model" else "user"
        out.append(Message(role, _parts(c.get("parts"), f"contents[{i}].parts", calls)))
    return out


def _tools(raw: object) -> list[Tool]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("Invalid value at 'tools': must be an array.")
    tools = []
    for t in raw:
        for fn in (t.get("functionDeclarations") or []) if isinstance(t, dict) else []:
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise BadRequest("Invalid value at 'tools': a function needs a name.")
            params = fn.get("parameters") or fn.get("parametersJsonSchema")
            tools.append(Tool(fn["name"], str(fn.get("description") or ""),
                              params if isinstance(params, dict) else {"type": "object"}))
    return tools


def _number(config: Mapping[str, Any], name: str) -> float | None:
    value = config.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"Invalid value at 'generation_config.{name}': must be a number.")
    return float(value)


def _chunk_doc(parts: list[dict[str, Any]], model: str, response_id: str,
               finish: str | None = None, usage: Usage | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    doc: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        doc["usageMetadata"] = _usage_json(usage)
    doc["modelVersion"] = model
    doc["responseId"] = response_id
    return doc


def _to_part(p: Part) -> dict[str, Any]:
    if p.kind == "image" and p.url:
        return {"fileData": {"mimeType": p.media_type or "image/jpeg", "fileUri": p.url}}
    if p.kind == "image":
        return {"inlineData": {"mimeType": p.media_type, "data": p.data}}
    if p.kind == "tool_call":
        return {"functionCall": {"name": p.name,
                                 "args": client_json_value(p.arguments, "A tool call's arguments")}}
    if p.kind == "tool_result":
        try:
            response = orjson.loads(p.text)
        except orjson.JSONDecodeError:
            response = None
        if not isinstance(response, dict):
            response = {"result": p.text}
        return {"functionResponse": {"name": p.name, "response": response}}
    return {"text": p.text}


class _Scanner(Relay):
    """Pass-through for a Gemini stream to a Gemini client: bytes untouched."""

    def __init__(self) -> None:
        self._sse = SSEBuffer()
        self._events = 0

    def feed(self, data: bytes) -> bytes:
        for event in self._sse.feed(data):
            self._events += 1
            if b"usageMetadata" in event.data or b'"error"' in event.data:
                doc = event.json()
                if isinstance(doc, dict):
                    self.usage = usage_from(doc.get("usageMetadata")) or self.usage
                    self.failed = self.failed or isinstance(doc.get("error"), dict)
        return data

    def finish(self) -> bytes:
        self._sse.rest()
        return b""

    def estimated_completion_tokens(self) -> int:
        return self._events


class _Decoder(Decoder):
    def __init__(self) -> None:
        super().__init__()
        self._started = False
        self._calls = 0

    def read(self, doc: dict[str, Any]) -> list[Delta]:
        if isinstance(doc.get("error"), dict):
            error = doc["error"]
            return [Failure(positive_int(error.get("code")) or 502,
                            str(error.get("message") or "upstream error"))]
        out: list[Delta] = []
        if not self._started:
            self._started = True
            out.append(Start(str(doc.get("responseId") or ""), str(doc.get("modelVersion") or "")))
        self.usage = usage_from(doc.get("usageMetadata")) or self.usage
        for candidate in (doc.get("candidates") or [])[:1]:
            content = candidate.get("content") or {}
            for p in content.get("parts") or ():
                if p.get("thought"):
                    continue
                if isinstance(p.get("text"), str) and p["text"]:
                    out.append(Text(p["text"]))
                elif isinstance(p.get("functionCall"), dict):
                    fn = p["functionCall"]
                    out.append(ToolStart(self._calls, str(fn.get("id") or
                                                          f"call_{secrets.token_hex(8)}"),
                                         str(fn.get("name") or "")))
                    out.append(ToolArgs(self._calls, orjson.dumps(fn.get("args") or {}).decode()))
                    self._calls += 1
            reason = candidate.get("finishReason")
            if reason:
                neutral = _FINISH_TO_NEUTRAL.get(reason, "stop")
                out.append(Stop("tool_calls" if self._calls and neutral == "stop" else neutral))
        return out


class _Encoder(Encoder):
    def __init__(self, chat: Chat) -> None:
        self._model = chat.model
        self._id = secrets.token_urlsafe(16)
        self._calls: dict[int, list[str]] = {}  # ordinal → [name, args so far]
        self._stop: str | None = None

    def _event(self, doc: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(doc) + _SEP

    def encode(self, deltas: list[Delta]) -> bytes:
        out = []
        for d in deltas:
            if isinstance(d, Text):
                out.append(self._event(_chunk_doc([{"text": d.text}], self._model, self._id)))
            elif isinstance(d, ToolStart):
                self._calls[d.index] = [d.name, ""]
            elif isinstance(d, ToolArgs) and d.index in self._calls:
                self._calls[d.index][1] += d.json
            elif isinstance(d, Stop):
                self._stop = d.reason
            elif isinstance(d, Failure):
                out.append(self._event(_error_doc(d.status, d.message)))
        return b"".join(out)

    def finish(self, usage: Usage | None) -> bytes:
        if self._stop is None:
            return b""
        parts = [{"functionCall": {"name": name, "args": orjson.loads(args or "{}")}}
                 for name, args in self._calls.values()]
        return self._event(_chunk_doc(parts, self._model, self._id,
                                      _NEUTRAL_TO_FINISH.get(self._stop, "STOP"), usage))


class GeminiWire(Wire):
    kind = "gemini"

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"x-goog-api-key": key}

    def parse(self, body: bytes, *, model: str | None = None,
              stream: bool | None = None) -> Chat:
        payload = request_object(
            body, "Invalid JSON payload received. The body must be an object.")
        if not model:
            raise BadRequest("The model is named in the URL: models/{model}:generateContent.",
                             param="model")
        config = payload.get("generationConfig") or {}
        if not isinstance(config, dict):
            raise BadRequest("Invalid value at 'generation_config': must be an object.")
        system = payload.get("systemInstruction")
        system_text = "".join(p.get("text", "") for p in system.get("parts") or ()
                              if isinstance(p, dict)) if isinstance(system, dict) else None
        mode_config = (payload.get("toolConfig") or {}).get("functionCallingConfig") or {}
        mode = mode_config.get("mode")
        allowed = mode_config.get("allowedFunctionNames") or []
        max_tokens = config.get("maxOutputTokens")
        if max_tokens is not None and (isinstance(max_tokens, bool)
                                       or not isinstance(max_tokens, int) or max_tokens < 1):
            raise BadRequest("Invalid value at 'generation_config.max_output_tokens'.")
        stop = config.get("stopSequences") or []
        return Chat(
            model=model, stream=bool(stream), messages=_messages(payload.get("contents")),
            payload=payload, system=system_text or None, max_tokens=max_tokens,
            temperature=_number(config, "temperature"), top_p=_number(config, "topP"),
            stop=[s for s in stop if isinstance(s, str)],
            tools=_tools(payload.get("tools")),
            tool_choice="tool" if mode == "ANY" and len(allowed) == 1 else
            {"AUTO": "auto", "ANY": "required", "NONE": "none"}.get(str(mode)),
            tool_choice_name=allowed[0] if mode == "ANY" and len(allowed) == 1 else None,
            fallbacks=fallbacks(payload, model), wants_usage=True,
        )

    def request(self, chat: Chat, target: Target, *, same_format: bool) -> UpstreamRequest:
        action = ":streamGenerateContent?alt=sse" if chat.stream else ":generateContent"
        url = f"{target.base_url}/models/{target.upstream_model}{action}"
        if same_format:
            payload = {k: v for k, v in chat.payload.items() if k != "models"}
        else:
            payload = self._build(chat)
        return UpstreamRequest(url, target.headers, client_json(payload))

    @staticmethod
    def _build(chat: Chat) -> dict[str, Any]:
        contents = []
        for m in chat.messages:
            parts = [_to_part(p) for p in m.parts if p.kind != "text" or p.text]
            if parts:
                contents.append({"role": "model" if m.role == "assistant" else "user",
                                 "parts": parts})
        body: dict[str, Any] = {"contents": contents}
        if chat.system:
            body["systemInstruction"] = {"parts": [{"text": chat.system}]}
        config = {name: value for name, value in (
            ("maxOutputTokens", chat.max_tokens), ("temperature", chat.temperature),
            ("topP", chat.top_p), ("stopSequences", chat.stop or None)) if value is not None}
        if config:
            body["generationConfig"] = config
        if chat.tools:
            body["tools"] = [{"functionDeclarations": [
                {"name": t.name, "description": t.description,
                 "parameters": _schema(t.parameters)} for t in chat.tools]}]
        if chat.tool_choice is not None:
            fcc: dict[str, Any] = {"mode": {"auto": "AUTO", "required": "ANY", "none": "NONE",
                                            "tool": "ANY"}[chat.tool_choice]}
            if chat.tool_choice == "tool":
                fcc["allowedFunctionNames"] = [chat.tool_choice_name]
            body["toolConfig"] = {"functionCallingConfig": fcc}
        return body

    def reply_usage(self, body: bytes) -> Usage | None:
        doc = json_object_or_none(body)
        return usage_from(doc.get("usageMetadata")) if doc is not None else None

    def decode_reply(self, body: bytes) -> Reply:
        doc = orjson.loads(body)
        decoder = _Decoder()
        deltas = decoder.read(doc)
        text = "".join(d.text for d in deltas if isinstance(d, Text))
        calls = {d.index: Part("tool_call", call_id=d.call_id, name=d.name)
                 for d in deltas if isinstance(d, ToolStart)}
        for d in deltas:
            if isinstance(d, ToolArgs):
                calls[d.index].arguments = d.json
        stop = next((d.reason for d in deltas if isinstance(d, Stop)), "stop")
        return Reply(id=str(doc.get("responseId") or ""), model=str(doc.get("modelVersion") or ""),
                     text=text, tool_calls=list(calls.values()), stop=stop,
                     usage=decoder.usage)

    def encode_reply(self, reply: Reply, model: str) -> bytes:
        parts: list[dict[str, Any]] = [{"text": reply.text}] if reply.text else []
        parts += [{"functionCall": {"name": c.name, "args": orjson.loads(c.arguments or "{}")}}
                  for c in reply.tool_calls]
        return orjson.dumps(_chunk_doc(parts, model, secrets.token_urlsafe(16),
                                       _NEUTRAL_TO_FINISH.get(reply.stop, "STOP"),
                                       reply.usage or Usage()))

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
        return b"data: " + orjson.dumps(_error_doc(err.status, err.message)) + _SEP

