"""Every wire format through the gateway with the official SDKs, on real sockets: the
anthropic SDK on /v1/messages, the openai SDK on Claude- and Gemini-hosted models (tool
calls included), Gemini's own paths; the event bills exactly what the mock reported."""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from devstack.upstream_anthropic import MockAnthropicUpstream
from devstack.upstream_gemini import MockGeminiUpstream
from devstack.upstream_openai import MockOpenAIUpstream
from shared.events import Event
from tests.proxy.conftest import Gateway

MESSAGES: Any = [{"role": "user", "content": "Say hello."}]
TOOLS: Any = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# USD per million tokens → micro-dollars per million, as in the conftest catalog.
CLAUDE = {"prompt": 800_000, "completion": 4_000_000, "read": 80_000, "write": 1_000_000}
GEMINI = {"prompt": 100_000, "completion": 400_000, "read": 25_000, "reasoning": 700_000}


def _ceil(total: int) -> int:
    return -(-total // 1_000_000)


def _claude_cost(u: dict[str, int]) -> int:
    return _ceil(u["input_tokens"] * CLAUDE["prompt"]
                 + u["cache_read_input_tokens"] * CLAUDE["read"]
                 + u["cache_creation_input_tokens"] * CLAUDE["write"]
                 + u["output_tokens"] * CLAUDE["completion"])


def _gemini_cost(u: dict[str, int]) -> int:
    cached = u.get("cachedContentTokenCount", 0)
    thoughts = u.get("thoughtsTokenCount", 0)
    return _ceil((u["promptTokenCount"] - cached) * GEMINI["prompt"] + cached * GEMINI["read"]
                 + u["candidatesTokenCount"] * GEMINI["completion"]
                 + thoughts * GEMINI["reasoning"])


def _assert_claude_billed(event: Event, u: dict[str, int]) -> None:
    assert event.usage_source == "upstream" and event.provider == "claude"
    assert event.prompt_tokens == u["input_tokens"] + u["cache_read_input_tokens"] \
        + u["cache_creation_input_tokens"]
    assert (event.cached_tokens, event.cache_write_tokens, event.completion_tokens) == (
        u["cache_read_input_tokens"], u["cache_creation_input_tokens"], u["output_tokens"])
    assert event.cost_micros == _claude_cost(u) > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_sdk_through_messages_is_passed_through_and_billed_exactly(
    gateway: Gateway, api_key: str, mock_anthropic: MockAnthropicUpstream, stream: bool,
) -> None:
    mock_anthropic.behaviour.cache_read_tokens = 30
    mock_anthropic.behaviour.cache_write_tokens = 11
    async with gateway.anthropic(api_key) as client:
        if stream:
            async with client.messages.stream(model="claude-demo", max_tokens=100,
                                              messages=MESSAGES) as s:
                text = "".join([t async for t in s.text_stream])
                message = await s.get_final_message()
        else:
            message = await client.messages.create(model="claude-demo", max_tokens=100,
                                                   messages=MESSAGES)
            text = message.content[0].text  # type: ignore[union-attr]
    assert text == mock_anthropic.behaviour.reply
    [reported] = mock_anthropic.reported_usage
    assert message.usage.output_tokens == reported["output_tokens"]
    assert message.usage.cache_read_input_tokens == 30
    [event] = await gateway.events(1)
    assert event.endpoint == "/v1/messages" and event.stream is stream
    _assert_claude_billed(event, reported)
    assert mock_anthropic.requests[0].headers["x-api-key"] == "sk-upstream-test"
    assert mock_anthropic.requests[0].body["model"] == "claude-demo-haiku"


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_sdk_gets_claude_with_tool_calls(
    gateway: Gateway, api_key: str, mock_anthropic: MockAnthropicUpstream, stream: bool,
) -> None:
    mock_anthropic.behaviour.tool_call = ("get_weather", {"city": "Oslo"})
    async with gateway.client(api_key) as client:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                model="claude-demo", messages=MESSAGES, tools=TOOLS, stream=True,
                stream_options={"include_usage": True})]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            args = "".join(tc.function.arguments or "" for c in chunks if c.choices
                           for tc in c.choices[0].delta.tool_calls or ()
                           if tc.function is not None)
            names = [tc.function.name for c in chunks if c.choices
                     for tc in c.choices[0].delta.tool_calls or ()
                     if tc.function is not None and tc.function.name]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            usage = chunks[-1].usage
        else:
            done = await client.chat.completions.create(model="claude-demo", messages=MESSAGES,
                                                        tools=TOOLS)
            message = done.choices[0].message
            text, finish, usage = message.content or "", done.choices[0].finish_reason, done.usage
            call = (message.tool_calls or [])[0]
            names, args = [call.function.name], call.function.arguments  # type: ignore[union-attr]
    assert text == mock_anthropic.behaviour.reply
    assert names == ["get_weather"] and orjson.loads(args) == {"city": "Oslo"}
    assert finish == "tool_calls"
    [reported] = mock_anthropic.reported_usage
    assert usage is not None and usage.completion_tokens == reported["output_tokens"]
    sent = mock_anthropic.requests[0].body
    assert sent["tools"][0]["input_schema"]["properties"]["city"] == {"type": "string"}
    [event] = await gateway.events(1)
    _assert_claude_billed(event, reported)


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_sdk_gets_gemini_with_tool_calls_and_thinking_billed(
    gateway: Gateway, api_key: str, mock_gemini: MockGeminiUpstream, stream: bool,
) -> None:
    mock_gemini.behaviour.tool_call = ("get_weather", {"city": "Oslo"})
    mock_gemini.behaviour.cache_read_tokens = 8
    mock_gemini.behaviour.reasoning_tokens = 6
    async with gateway.client(api_key) as client:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                model="gemini-demo", messages=MESSAGES, tools=TOOLS, stream=True)]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            calls = [tc for c in chunks if c.choices
                     for tc in c.choices[0].delta.tool_calls or ()]
            assert all(c.usage is None for c in chunks), "usage only when asked for"
        else:
            done = await client.chat.completions.create(model="gemini-demo", messages=MESSAGES,
                                                        tools=TOOLS)
            text = done.choices[0].message.content or ""
            calls = list(done.choices[0].message.tool_calls or [])  # type: ignore[arg-type]
    assert text == mock_gemini.behaviour.reply
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    path = mock_gemini.requests[0].path
    assert path.endswith(":streamGenerateContent" if stream else ":generateContent")
    [reported] = mock_gemini.reported_usage
    [event] = await gateway.events(1)
    assert event.usage_source == "upstream" and event.reasoning_tokens == 6
    assert event.cached_tokens == 8
    assert event.cost_micros == _gemini_cost(reported) > 0


@pytest.mark.parametrize("stream", [False, True])
async def test_gemini_native_paths_pass_through(
    gateway: Gateway, api_key: str, mock_gemini: MockGeminiUpstream, stream: bool,
) -> None:
    root = gateway.base_url.removesuffix("/v1")
    action = "streamGenerateContent?alt=sse" if stream else "generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
    async with aiohttp.ClientSession() as s, s.post(
        f"{root}/v1beta/models/gemini-demo:{action}", json=body,
        headers={"x-goog-api-key": api_key},
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    last = orjson.loads(raw.rstrip().split(b"\r\n\r\n")[-1].removeprefix(b"data: "))
    [reported] = mock_gemini.reported_usage
    assert last["usageMetadata"] == reported
    [event] = await gateway.events(1)
    assert event.cost_micros == _gemini_cost(reported)
    assert mock_gemini.requests[0].headers["x-goog-api-key"] == "sk-upstream-test"


async def test_anthropic_sdk_reaches_an_openai_model(
    gateway: Gateway, api_key: str, mock_upstream: MockOpenAIUpstream,
) -> None:
    async with gateway.anthropic(api_key) as client:
        async with client.messages.stream(model="demo-mini", max_tokens=50,
                                          system="Be brief.", messages=MESSAGES) as s:
            text = "".join([t async for t in s.text_stream])
            final = await s.get_final_message()
        plain = await client.messages.create(model="demo-mini", max_tokens=50,
                                             messages=MESSAGES)
    assert text == mock_upstream.behaviour.reply == plain.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    assert mock_upstream.requests[0].body["messages"][0] == {"role": "system",
                                                             "content": "Be brief."}
    events = await gateway.events(2)
    assert all(e.usage_source == "upstream" and e.cost_micros > 0 for e in events)


async def test_embeddings_and_legacy_completions_for_openai_upstreams(
    gateway: Gateway, api_key: str,
) -> None:
    async with gateway.client(api_key) as client:
        emb = await client.embeddings.create(model="demo-mini", input=["a", "bb"])
        comp = await client.completions.create(model="demo-mini", prompt="Once", max_tokens=3)
        with pytest.raises(openai.BadRequestError):
            await client.embeddings.create(model="claude-demo", input="x")
    assert len(emb.data) == 2 and comp.choices[0].text
    events = await gateway.events(3)
    assert [e.endpoint for e in events] == ["/v1/embeddings", "/v1/completions",
                                            "/v1/embeddings"]
    assert events[0].prompt_tokens == emb.usage.prompt_tokens and events[0].cost_micros > 0


async def _raw(gateway: Gateway, path: str, body: bytes, headers: dict[str, str]
               ) -> tuple[int, Any]:
    root = gateway.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as s, s.post(root + path, data=body,
                                                    headers=headers) as resp:
        return resp.status, await resp.json()


async def test_bad_input_gets_each_api_error_shape_never_500(
    gateway: Gateway, api_key: str,
) -> None:
    bearer = {"Authorization": f"Bearer {api_key}"}
    status, doc = await _raw(gateway, "/v1/messages", b'{"model":"claude-demo"}',
                             {"x-api-key": api_key})
    assert status == 400 and doc["type"] == "error"
    assert doc["error"]["type"] == "invalid_request_error"
    status, doc = await _raw(gateway, "/v1/messages", b"{}", {})
    assert status == 401 and doc["error"]["type"] == "authentication_error"
    status, doc = await _raw(gateway, "/v1beta/models/gemini-demo:generateContent",
                             b'{"contents": "nope"}', {"x-goog-api-key": api_key})
    assert status == 400 and doc["error"]["status"] == "INVALID_ARGUMENT"
    status, doc = await _raw(gateway, f"/v1beta/models/nothing:generateContent?key={api_key}",
                             b'{"contents": [{"parts": [{"text": "x"}]}]}', {})
    assert status == 404 and doc["error"]["status"] == "NOT_FOUND"
    for path, body in [
        ("/v1/chat/completions", {"model": "demo-mini", "messages": MESSAGES,
                                  "api_base": "http://attacker.example"}),
        ("/v1/messages", {"model": "claude-demo", "max_tokens": 5, "messages": MESSAGES,
                          "base_url": "http://attacker.example"}),
    ]:
        status, doc = await _raw(gateway, path, orjson.dumps(body), bearer)
        assert status == 400 and "chooses the upstream" in str(doc)
    events = await gateway.events(6)
    assert all(e.status < 500 for e in events)


async def test_upstream_refusal_is_rendered_in_the_clients_format(
    gateway: Gateway, api_key: str, mock_anthropic: MockAnthropicUpstream,
) -> None:
    mock_anthropic.behaviour.error_status = 429
    async with gateway.client(api_key) as client:
        with pytest.raises(openai.RateLimitError) as exc:
            await client.chat.completions.create(model="claude-demo", messages=MESSAGES)
    assert exc.value.body["message"] == "Mock upstream error 429."  # type: ignore[index]
    async with gateway.anthropic(api_key) as client:
        with pytest.raises(anthropic.RateLimitError):
            await client.messages.create(model="claude-demo", max_tokens=5, messages=MESSAGES)
