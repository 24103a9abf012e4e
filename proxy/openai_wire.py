"""What the proxy knows of the OpenAI chat-completions wire format.

- ``prepare_request``: validate the client's JSON and rewrite it for the upstream
  (upstream model id; usage always requested on streams).
- ``usage_from``: token counts from a ``usage`` object.
- ``StreamScanner``: an incremental SSE scanner that passes bytes through untouched,
  reads usage as it flies by, and cuts the extra usage-only chunk when the client did
  not ask for it.

Pure functions and small classes; no I/O. Must not import the handlers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import BadRequest, InvalidJSON
from proxy.providers.base import Usage

__all__ = ["ChatRequest", "StreamScanner", "Usage", "parse_request", "upstream_body",
           "usage_from", "usage_from_response"]

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    stream: bool
    client_wants_usage: bool
    payload: dict[str, Any]
    max_tokens: int | None = None


def parse_request(body: bytes) -> ChatRequest:
    """Validate a chat-completions body; BadRequest names the offending parameter."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJSON() from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("You must provide a model parameter.", param="model")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", param="messages")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", param="stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object.", param="stream_options")
    wants_usage = bool(options and options.get("include_usage") is True)
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise BadRequest("'max_tokens' must be a positive integer.", param="max_tokens")
    return ChatRequest(model, stream, wants_usage, payload, max_tokens)


def upstream_body(req: ChatRequest, upstream_model: str) -> bytes:
    """The body to send upstream: our model id, and usage always asked for on streams."""
    payload = req.payload
    payload["model"] = upstream_model
    if req.stream:
        options = payload.get("stream_options") or {}
        payload["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(payload)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        cached_tokens=_int(prompt_details.get("cached_tokens"))
        if isinstance(prompt_details, dict) else 0,
        reasoning_tokens=_int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict) else 0,
    )


def usage_from_response(body: bytes) -> Usage | None:
    """Usage from a non-streamed completion body, or None if it has none."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return usage_from(doc.get("usage")) if isinstance(doc, dict) else None


class StreamScanner:
    """Feed upstream SSE bytes in, get client bytes out; usage is read on the way.

    With ``forward_usage`` the output is exactly the input, chunk for chunk. Without it,
    only whole events are released (a partial event waits for its end, which in practice
    arrives in the same read), and a usage-only chunk (``choices`` empty) is cut.
    """

    __slots__ = ("_forward_usage", "_pending", "events", "usage")

    def __init__(self, *, forward_usage: bool) -> None:
        self._forward_usage = forward_usage
        self._pending = b""
        self.events = 0
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        start = 0
        cut: list[tuple[int, int]] = []
        for m in _EVENT_END.finditer(buf):
            end = m.end()
            self.events += 1
            if _USAGE_OBJECT.search(buf, start, end) and self._read_usage(buf[start:end]):
                cut.append((start, end))
            start = end
        self._pending = buf[start:]
        if self._forward_usage:
            return data
        if not cut:
            return buf[:start]
        out, at = [], 0
        for a, b in cut:
            out.append(buf[at:a])
            at = b
        out.append(buf[at:start])
        return b"".join(out)

    def finish(self) -> bytes:
        """Whatever partial event is left when the upstream closes (forwarded as is)."""
        rest, self._pending = self._pending, b""
        return b"" if self._forward_usage else rest

    def _read_usage(self, event: bytes) -> bool:
        """Record the usage in one event; True if it is a usage-only chunk."""
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            try:
                doc = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return False
            if not isinstance(doc, dict):
                return False
            usage = usage_from(doc.get("usage"))
            if usage is None:
                return False
            self.usage = usage
            return not doc.get("choices")
        return False
