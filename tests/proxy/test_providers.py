"""Each wire reads usage exactly, with its provider's quirks, and translation between
any two wires keeps text, tool calls, stop reasons and usage."""

from __future__ import annotations

import orjson
import pytest

from proxy.errors import BadRequest, UpstreamFailed, UpstreamTimeout
from proxy.providers.base import Chat, Usage
from proxy.providers.registry import WIRES, stream_relay, translate_reply
from proxy.providers.sse import SSEBuffer
from shared.pricing import Price

OPENAI, ANTHROPIC, GEMINI = WIRES["openai"], WIRES["anthropic"], WIRES["gemini"]


def _feed(relay: object, data: bytes, size: int) -> bytes:
    out = b"".join(relay.feed(data[i:i + size]) for i in range(0, len(data), size))  # type: ignore[attr-defined]
    return out + relay.finish()  # type: ignore[attr-defined]


def _ev(name: str, doc: dict[str, object]) -> bytes:
    return f"event: {name}\ndata: ".encode() + orjson.dumps(doc) + b"\n\n"


ANTHROPIC_STREAM = b"".join([
    _ev("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "model": "claude", "usage": {
            "input_tokens": 10, "cache_creation_input_tokens": 7,
            "cache_read_input_tokens": 20, "output_tokens": 1}}}),
    _ev("content_block_start", {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}}),
    _ev("ping", {"type": "ping"}),
    _ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": "Hello"}}),
    _ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
    _ev("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}}),
    _ev("content_block_delta", {"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": '{"ci'}}),
    _ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
        "type": "input_json_delta", "partial_json": 'ty":"Oslo"}'}}),
    _ev("content_block_stop", {"type": "content_block_stop", "index": 1}),
    _ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                          "usage": {"output_tokens": 3}}),
    _ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                          "usage": {"input_tokens": 10, "cache_creation_input_tokens": 7,
                                    "cache_read_input_tokens": 20, "output_tokens": 9}}),
    _ev("message_stop", {"type": "message_stop"}),
])
ANTHROPIC_USAGE = Usage(prompt_tokens=37, completion_tokens=9, cached_tokens=20,
                        cache_write_tokens=7)


def _gem(doc: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\r\n\r\n"


GEMINI_STREAM = b"".join([
    _gem({"candidates": [{"content": {"role": "model", "parts": [{"text": "Hel"}]}}],
          "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 1},
          "responseId": "r1", "modelVersion": "gemini-x"}),
    _gem({"candidates": [{"content": {"role": "model", "parts": [
        {"text": "lo"}, {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}]},
        "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 8,
                          "cachedContentTokenCount": 12, "thoughtsTokenCount": 4,
                          "totalTokenCount": 42}}),
])
GEMINI_USAGE = Usage(prompt_tokens=30, completion_tokens=12, cached_tokens=12,
                     reasoning_tokens=4)


def _chat(model: str = "m", *, stream: bool = True, wants_usage: bool = True) -> Chat:
    return Chat(model=model, stream=stream, messages=[], payload={}, wants_usage=wants_usage)


@pytest.mark.parametrize("size", [1, 13, 4096])
def test_anthropic_stream_passes_through_and_takes_the_last_cumulative_usage(size: int) -> None:
    relay = stream_relay(ANTHROPIC, ANTHROPIC, _chat())
    assert _feed(relay, ANTHROPIC_STREAM, size) == ANTHROPIC_STREAM
    assert relay.usage == ANTHROPIC_USAGE and not relay.failed


def test_anthropic_mid_stream_error_marks_the_stream_failed() -> None:
    relay = stream_relay(ANTHROPIC, ANTHROPIC, _chat())
    relay.feed(ANTHROPIC_STREAM[:300] + b"\n\n" + _ev("error", {
        "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
    assert relay.failed


@pytest.mark.parametrize("size", [1, 29, 4096])
def test_gemini_stream_takes_the_final_usage_metadata(size: int) -> None:
    relay = stream_relay(GEMINI, GEMINI, _chat())
    assert _feed(relay, GEMINI_STREAM, size) == GEMINI_STREAM
    assert relay.usage == GEMINI_USAGE


def _openai_events(data: bytes) -> list[dict[str, object]]:
    docs = []
    for event in SSEBuffer().feed(data):
        if event.data != b"[DONE]":
            docs.append(orjson.loads(event.data))
    return docs


@pytest.mark.parametrize(("upstream", "stream", "usage"), [
    (ANTHROPIC, ANTHROPIC_STREAM, ANTHROPIC_USAGE), (GEMINI, GEMINI_STREAM, GEMINI_USAGE)])
def test_streams_translate_to_openai_chunks_with_tool_calls_and_usage(
    upstream: object, stream: bytes, usage: Usage
) -> None:
    relay = stream_relay(OPENAI, upstream, _chat("public-name"))  # type: ignore[arg-type]
    out = _feed(relay, stream, 7)
    assert out.endswith(b"data: [DONE]\n\n")
    docs = _openai_events(out)
    text = "".join(c["choices"][0]["delta"].get("content") or ""  # type: ignore[index]
                   for c in docs if c["choices"])
    assert text == "Hello"
    calls = [tc for c in docs if c["choices"]
             for tc in c["choices"][0]["delta"].get("tool_calls") or ()]  # type: ignore[index]
    assert calls[0]["function"]["name"] == "weather"
    args = "".join(tc["function"]["arguments"] for tc in calls)
    assert orjson.loads(args) == {"city": "Oslo"}
    finish = [c["choices"][0]["finish_reason"] for c in docs if c["choices"]]  # type: ignore[index]
    assert finish[-1] == "tool_calls"
    assert docs[-1]["usage"]["prompt_tokens"] == usage.prompt_tokens  # type: ignore[index]
    assert all(c["model"] == "public-name" for c in docs)
    assert relay.usage == usage


def test_openai_stream_translates_to_anthropic_events() -> None:
    chunks = b"".join(b"data: " + orjson.dumps(d) + b"\n\n" for d in [
        {"id": "c", "model": "g", "choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{
            "index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a":1}'}}]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        # The usage chunk with choices null: tolerated.
        {"id": "c", "choices": None, "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                               "prompt_tokens_details": {"cached_tokens": 1}}},
    ]) + b"data: [DONE]\n\n"
    relay = stream_relay(ANTHROPIC, OPENAI, _chat("claude-public"))
    out = _feed(relay, chunks, 5)
    names = [e.name for e in SSEBuffer().feed(out)]
    assert names[0] == b"message_start" and names[-1] == b"message_stop"
    assert b"input_json_delta" in out and b'"stop_reason":"tool_use"' in out
    assert relay.usage == Usage(prompt_tokens=5, completion_tokens=2, cached_tokens=1)
    # A passthrough to an Anthropic client re-reads the same usage from what we wrote.
    again = stream_relay(ANTHROPIC, ANTHROPIC, _chat())
    again.feed(out)
    assert again.usage == relay.usage


def test_non_stream_replies_translate_both_ways() -> None:
    anthropic_reply = orjson.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "text", "text": "Hi"},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 3, "output_tokens": 4,
                                             "cache_read_input_tokens": 2}})
    body, usage = translate_reply(OPENAI, ANTHROPIC, anthropic_reply, "pub")
    doc = orjson.loads(body)
    assert doc["choices"][0]["finish_reason"] == "tool_calls"
    assert doc["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"x":1}'
    assert doc["usage"]["prompt_tokens"] == 5 and usage == Usage(5, 4, cached_tokens=2)
    back, usage2 = translate_reply(GEMINI, OPENAI, body, "pub")
    gem = orjson.loads(back)
    assert gem["candidates"][0]["content"]["parts"][1]["functionCall"]["args"] == {"x": 1}
    assert usage2 == Usage(5, 4, cached_tokens=2)


@pytest.mark.parametrize("body", [
    b"<html>Bad gateway</html>",
    # A tool input nested deeper than orjson writes: it cannot be re-rendered.
    b'{"type": "message", "content": [{"type": "tool_use", "id": "t", "name": "f", '
    b'"input": ' + b'{"d": ' * 300 + b"{}" + b"}" * 300 + b"}]}",
])
def test_a_reply_that_cannot_be_translated_is_the_upstreams_failure(body: bytes) -> None:
    with pytest.raises(UpstreamFailed):
        translate_reply(OPENAI, ANTHROPIC, body, "pub")


def test_openai_request_translates_system_images_and_tools_to_anthropic_and_gemini() -> None:
    body = orjson.dumps({
        "model": "x", "max_tokens": 50, "stop": "END",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "look", "arguments": '{"q":"x"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"}],
        "tools": [{"type": "function", "function": {"name": "look", "parameters": {
            "type": "object", "additionalProperties": False}}}],
        "tool_choice": "required"})
    chat = OPENAI.parse(body)

    class T:
        base_url, upstream_model, headers = "http://u/v1", "up-model", {}

    a = orjson.loads(ANTHROPIC.request(chat, T(), same_format=False).body)
    assert a["system"] == "Be brief." and a["max_tokens"] == 50 and a["stop_sequences"] == ["END"]
    assert [b["type"] for b in a["messages"][0]["content"]] == ["text", "image", "image"]
    assert a["messages"][0]["content"][1]["source"] == {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}
    assert a["messages"][1]["content"][0] == {
        "type": "tool_use", "id": "call_1", "name": "look", "input": {"q": "x"}}
    assert a["messages"][2]["content"][0]["tool_use_id"] == "call_1"
    assert a["tool_choice"] == {"type": "any"}
    g_req = GEMINI.request(chat, T(), same_format=False)
    assert g_req.url == "http://u/v1/models/up-model:generateContent"
    g = orjson.loads(g_req.body)
    assert g["systemInstruction"]["parts"][0]["text"] == "Be brief."
    assert g["contents"][2]["parts"][0]["functionResponse"]["name"] == "look"
    assert "additionalProperties" not in g["tools"][0]["functionDeclarations"][0]["parameters"]


@pytest.mark.parametrize(("wire", "body", "kw"), [
    (OPENAI, b'{"model":"m","messages":[{"role":"user","content":"x"}],"api_base":"http://evil"}',
     {}),
    (ANTHROPIC, b'{"model":"m","max_tokens":5,"messages":[],"base_url":"http://evil"}', {}),
    (GEMINI, b'{"contents":[{"parts":[{"text":"x"}]}],"base_url":"http://e"}', {"model": "g"}),
])
def test_a_body_naming_an_upstream_url_is_refused(wire: object, body: bytes,
                                                  kw: dict[str, str]) -> None:
    with pytest.raises(BadRequest, match="gateway chooses the upstream"):
        wire.parse(body, **kw)  # type: ignore[attr-defined]


def test_errors_take_each_api_shape() -> None:
    err = BadRequest("max_tokens: Field required")
    assert orjson.loads(ANTHROPIC.error_body(err)) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required"}}
    assert orjson.loads(GEMINI.error_body(err))["error"]["status"] == "INVALID_ARGUMENT"
    assert orjson.loads(OPENAI.error_body(err))["error"]["type"] == "invalid_request_error"
    assert ANTHROPIC.stream_error(UpstreamTimeout()).startswith(b"event: error\n")
    assert OPENAI.stream_error(UpstreamTimeout()).startswith(b'data: {"error"')


def test_price_bills_cache_and_reasoning_tokens_at_their_own_rates() -> None:
    price = Price(prompt=3_000_000, completion=15_000_000, cache_read=300_000,
                  cache_write=3_750_000, reasoning=20_000_000)
    u = ANTHROPIC_USAGE
    cost = price.cost_of(u.prompt_tokens, u.completion_tokens, cached_tokens=u.cached_tokens,
                         cache_write_tokens=u.cache_write_tokens)
    assert cost == -(-(10 * 3_000_000 + 20 * 300_000 + 7 * 3_750_000 + 9 * 15_000_000)
                     // 1_000_000)
    g = GEMINI_USAGE
    assert price.cost_of(g.prompt_tokens, g.completion_tokens, cached_tokens=g.cached_tokens,
                         reasoning_tokens=g.reasoning_tokens) == -(-(
                             18 * 3_000_000 + 12 * 300_000 + 8 * 15_000_000 + 4 * 20_000_000)
                             // 1_000_000)
    plain = Price(prompt=150_000, completion=600_000)
    assert plain.cost_of(11, 3, cached_tokens=4) == plain.cost_micros(11, 3)
