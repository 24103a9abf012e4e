"""The provider interface and the neutral forms translation goes through.

A ``Wire`` is one API format (OpenAI chat completions, Anthropic Messages, Gemini
generateContent). It parses and validates a client request into a neutral ``Chat``,
builds the upstream request for a deployment, reads usage from replies and streams,
translates replies and streams to and from neutral form, and renders errors in its own
shape. Requests whose client format equals the upstream's are passed through (only the
model id rewritten) and their streams relayed byte for byte.

Counting convention for ``Usage`` (OpenAI's): ``prompt_tokens`` includes the cache-read
(``cached_tokens``) and cache-write tokens; ``completion_tokens`` includes reasoning.

Must not import the handlers, the catalog or the upstream client.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from proxy.errors import BadRequest, InvalidJSON, ProxyError
from proxy.providers.sse import SSEBuffer

# Body fields that would point the gateway at a URL of the caller's choosing.
UPSTREAM_URL_FIELDS = frozenset({"api_base", "base_url", "api_url", "endpoint_url"})
BYTES_PER_TOKEN = 4  # rough estimate, used only when an upstream reports no usage
# orjson parses 1,024 levels of nesting but serialises only this many, so a body it
# accepted can fail when re-serialised for an upstream; deeper is the client's error.
MAX_JSON_DEPTH = 254


class NestedTooDeep(BadRequest):
    """A client document nested deeper than the gateway can forward upstream."""

    code = "json_too_deep"
    message = (f"The JSON of your request is nested too deeply: at most {MAX_JSON_DEPTH} "
               "levels can be forwarded upstream.")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(slots=True)
class Part:
    """One piece of a message: text, image, a tool call or a tool result."""

    kind: str  # "text" | "image" | "tool_call" | "tool_result"
    text: str = ""
    media_type: str | None = None  # image (base64) and Gemini file data
    data: str | None = None  # base64 image bytes
    url: str | None = None  # image by URL
    call_id: str = ""
    name: str = ""
    arguments: str = "{}"  # a tool call's arguments as JSON text
    is_error: bool = False


@dataclass(slots=True)
class Message:
    role: str  # "user" | "assistant"; tool results travel in user messages
    parts: list[Part]


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(slots=True)
class Chat:
    """A chat request in neutral form, plus the client's own payload for pass-through."""

    model: str
    stream: bool
    messages: list[Message]
    payload: dict[str, Any]
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str | None = None  # "auto" | "none" | "required" | "tool"
    tool_choice_name: str | None = None
    fallbacks: list[str] = field(default_factory=list)  # OpenRouter's ``models: [...]``
    wants_usage: bool = False  # OpenAI's stream_options.include_usage
    # "chat", or an OpenAI-only operation ("embeddings", "completions") that only an
    # upstream of the client's own format can serve.
    operation: str = "chat"

    def prompt_estimate(self) -> int:
        chars = len(self.system or "") + sum(
            len(p.text) + len(p.arguments) for m in self.messages for p in m.parts
        )
        return max(1, chars // BYTES_PER_TOKEN)


@dataclass(slots=True)
class Reply:
    """A finished (non-streamed) answer in neutral form."""

    id: str
    model: str
    text: str
    tool_calls: list[Part]
    stop: str  # "stop" | "length" | "tool_calls" | "content_filter"
    usage: Usage | None


# --- neutral stream deltas -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    id: str
    model: str


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class ToolStart:
    index: int
    call_id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolArgs:
    index: int
    json: str


@dataclass(frozen=True, slots=True)
class Stop:
    reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """An error event the upstream sent after its stream had started."""

    status: int
    message: str


Delta = Start | Text | ToolStart | ToolArgs | Stop | Failure


class Target(Protocol):
    """Where one attempt goes: what a catalog deployment provides."""

    @property
    def base_url(self) -> str: ...
    @property
    def upstream_model(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    url: str
    headers: Mapping[str, str]
    body: bytes


class Relay(ABC):
    """Upstream stream bytes in, client stream bytes out; usage read on the way."""

    usage: Usage | None = None
    failed: bool = False  # the upstream sent an error event mid-stream

    @abstractmethod
    def feed(self, data: bytes) -> bytes: ...

    @abstractmethod
    def finish(self) -> bytes:
        """Bytes still owed to the client once the upstream has ended its stream."""

    @abstractmethod
    def estimated_completion_tokens(self) -> int: ...


class Decoder(ABC):
    """Upstream stream bytes → neutral deltas, usage kept as it arrives.

    Every provider streams SSE events carrying one JSON object each: the framing is
    read here, and a wire's decoder only says what one event's object means.
    """

    usage: Usage | None = None

    def __init__(self) -> None:
        self._sse = SSEBuffer()

    def feed(self, data: bytes) -> list[Delta]:
        out: list[Delta] = []
        for event in self._sse.feed(data):
            doc = event.json()
            if isinstance(doc, dict):
                out += self.read(doc)
        return out

    @abstractmethod
    def read(self, doc: dict[str, Any]) -> list[Delta]:
        """The deltas one upstream event (its JSON object) carries."""


class Encoder(ABC):
    """Neutral deltas → client stream bytes."""

    @abstractmethod
    def encode(self, deltas: list[Delta]) -> bytes: ...

    @abstractmethod
    def finish(self, usage: Usage | None) -> bytes: ...


class Wire(ABC):
    kind: str
    keepalive: bytes = b": keep-alive\n\n"  # an SSE comment every client ignores

    @abstractmethod
    def auth_headers(self, key: str) -> dict[str, str]:
        """Headers that carry a provider key upstream (computed once, at start-up)."""

    @abstractmethod
    def parse(self, body: bytes, *, model: str | None = None,
              stream: bool | None = None) -> Chat:
        """Validate a client request; ``model``/``stream`` come from the URL if it has them."""

    def parse_operation(self, body: bytes, operation: str) -> Chat:
        """A request for an operation other than chat (embeddings, legacy completions)."""
        raise BadRequest(f"This API has no {operation} endpoint.")

    @abstractmethod
    def request(self, chat: Chat, target: Target, *, same_format: bool) -> UpstreamRequest: ...

    @abstractmethod
    def reply_usage(self, body: bytes) -> Usage | None: ...

    @abstractmethod
    def decode_reply(self, body: bytes) -> Reply: ...

    @abstractmethod
    def encode_reply(self, reply: Reply, model: str) -> bytes: ...

    @abstractmethod
    def scanner(self, chat: Chat) -> Relay:
        """The pass-through relay for a stream in this same format."""

    @abstractmethod
    def decoder(self) -> Decoder: ...

    @abstractmethod
    def encoder(self, chat: Chat) -> Encoder: ...

    @abstractmethod
    def error_body(self, err: ProxyError) -> bytes: ...

    @abstractmethod
    def stream_error(self, err: ProxyError) -> bytes:
        """An error delivered inside a stream that has already started."""

    def error_message(self, body: bytes) -> str | None:
        """The message of an upstream error body (for re-rendering in another format);
        every provider nests it as ``{"error": {"message": ...}}``."""
        doc = json_object_or_none(body)
        error = doc.get("error") if doc is not None else None
        message = error.get("message") if isinstance(error, dict) else None
        return message if isinstance(message, str) else None


# --- helpers every wire uses ---------------------------------------------------------


def request_object(body: bytes,
                   not_object: str = "The request body must be a JSON object.") -> dict[str, Any]:
    """A client's JSON body as an object, refusing bad JSON and upstream URLs in it."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJSON() from None
    if not isinstance(payload, dict):
        raise BadRequest(not_object)
    refuse_upstream_urls(payload)
    return payload


def client_json(value: object) -> bytes:
    """Client data (a whole payload or a part of it) as JSON for the upstream.

    Parsed JSON holds only what orjson can write back, except nesting deeper than
    ``MAX_JSON_DEPTH``, so catching its one error here costs the hot path nothing and
    never needs a walk over the body.
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise NestedTooDeep() from None


def client_json_value(text: str, what: str) -> Any:
    """A JSON text the client embedded in its request (a tool call's arguments) as a
    value, for a wire that carries it as an object."""
    try:
        return orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        raise BadRequest(f"{what} must be valid JSON text.") from None


def json_object_or_none(body: bytes) -> dict[str, Any] | None:
    """An upstream body as a JSON object, or None if it is not one."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def refuse_upstream_urls(payload: Mapping[str, Any]) -> None:
    named = UPSTREAM_URL_FIELDS & payload.keys()
    if named:
        name = sorted(named)[0]
        raise BadRequest(
            f"'{name}' is not accepted: this gateway chooses the upstream itself.", param=name
        )


def positive_int(value: object) -> int:
    """A token count from an upstream document; anything odd counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def optional_int(payload: Mapping[str, Any], name: str, minimum: int = 1) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequest(f"'{name}' must be an integer >= {minimum}.", param=name)
    return value


def optional_float(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number.", param=name)
    return float(value)


def fallbacks(payload: Mapping[str, Any], model: str) -> list[str]:
    """OpenRouter's ``models: [...]``: the models to try after ``model``, in order."""
    value = payload.get("models")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise BadRequest("'models' must be an array of model names.", param="models")
    return [m for m in dict.fromkeys(value) if m != model]


def split_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64) of a ``data:`` URL, or None for any other URL."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    return head.removesuffix(";base64") or "application/octet-stream", data
