"""Which wire speaks each provider kind, and translation between any two wires.

The hot path asks this module for a stream relay or a translated reply given the
client's wire and the upstream's; when both are the same format the bytes pass through
untouched, otherwise they go through the neutral form. No I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import orjson

from proxy.errors import ProxyError, UpstreamFailed, UpstreamRefused
from proxy.providers.anthropic import AnthropicWire
from proxy.providers.base import (
    BYTES_PER_TOKEN,
    Chat,
    Decoder,
    Encoder,
    Failure,
    Relay,
    Text,
    ToolArgs,
    Usage,
    Wire,
)
from proxy.providers.gemini import GeminiWire
from proxy.providers.openai import OpenAIWire

WIRES: Mapping[str, Wire] = MappingProxyType(
    {w.kind: w for w in (OpenAIWire(), AnthropicWire(), GeminiWire())}
)


class TranslatedRefusal(ProxyError):
    """An upstream's 4xx/429 re-rendered for a client that speaks another format."""

    outcome = "upstream_error"
    type = "upstream_error"

    def __init__(self, status: int, message: str, retry_after: str | None) -> None:
        super().__init__(message[:500])
        self.status = status
        self.code = f"upstream_{status}"
        if retry_after is not None:
            self.headers = {"Retry-After": retry_after}


class _Translation(Relay):
    def __init__(self, decoder: Decoder, encoder: Encoder) -> None:
        self._decoder = decoder
        self._encoder = encoder
        self._chars = 0

    def feed(self, data: bytes) -> bytes:
        deltas = self._decoder.feed(data)
        self.usage = self._decoder.usage
        for d in deltas:
            if isinstance(d, Text):
                self._chars += len(d.text)
            elif isinstance(d, ToolArgs):
                self._chars += len(d.json)
            elif isinstance(d, Failure):
                self.failed = True
        return self._encoder.encode(deltas)

    def finish(self) -> bytes:
        return self._encoder.finish(self._decoder.usage)

    def estimated_completion_tokens(self) -> int:
        return -(-self._chars // BYTES_PER_TOKEN)


def stream_relay(client: Wire, upstream: Wire, chat: Chat) -> Relay:
    if client is upstream:
        return upstream.scanner(chat)
    return _Translation(upstream.decoder(), client.encoder(chat))


def translate_reply(client: Wire, upstream: Wire, body: bytes,
                    model: str) -> tuple[bytes, Usage | None]:
    """The client's reply body and the usage in it, from the upstream's reply body.

    A reply that is not JSON, or nests deeper than orjson writes back, is the upstream's
    failure (502), not ours.
    """
    if client is upstream:
        return body, upstream.reply_usage(body)
    try:
        reply = upstream.decode_reply(body)
        return client.encode_reply(reply, model), reply.usage
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        raise UpstreamFailed() from None


def refusal_for(client: Wire, upstream: Wire, err: UpstreamRefused) -> ProxyError:
    """An upstream refusal in the client's format: as it came, or re-rendered."""
    if client is upstream:
        return err
    message = upstream.error_message(err.upstream_body) or err.message
    return TranslatedRefusal(err.status, message, err.retry_after)
