"""Routing and streaming under failure, on real sockets: fallbacks before the first byte
and never after, ejection and return, the retry budget, keep-alives during a slow first
token, the idle timeout, and a client that leaves cancelling its upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from devstack.upstream_anthropic import MockAnthropicUpstream
from devstack.upstream_openai import MockOpenAIUpstream, UpstreamBehaviour
from tests.proxy.conftest import Gateway, GatewayFactory

MESSAGES: Any = [{"role": "user", "content": "Say hello."}]
FIRST = 1_000_000  # a weight that makes a deployment all but certainly tried first


@pytest.fixture
async def flaky() -> AsyncIterator[MockOpenAIUpstream]:
    """A second OpenAI-format upstream that answers 503."""
    behaviour = UpstreamBehaviour(api_key="sk-upstream-test", error_status=503)
    async with MockOpenAIUpstream(behaviour=behaviour) as up:
        yield up


def _model(name: str, *deployments: tuple[str, str, int]) -> str:
    rows = ", ".join(f'{{ provider = "{p}", upstream_model = "{m}", weight = {w} }}'
                     for p, m, w in deployments)
    return f'\n[models."{name}"]\nprompt_price = 1\ncompletion_price = 1\n' \
           f"deployments = [{rows}]\n"


def _flaky_provider(flaky: MockOpenAIUpstream) -> str:
    return f'\n[providers.flaky]\nbase_url = "{flaky.base_url}"\n' \
           'api_key_env = "MOCK_UPSTREAM_KEY"\n'


async def test_fallback_to_the_next_deployment_on_503_and_refused_connections(
    start_gateway: GatewayFactory, api_key: str, flaky: MockOpenAIUpstream,
    mock_upstream: MockOpenAIUpstream,
) -> None:
    extra = _flaky_provider(flaky) + _model("ha-503", ("flaky", "x", FIRST),
                                            ("mock", "demo-mini-2024", 1)) \
        + _model("ha-dead", ("dead", "x", FIRST), ("mock", "demo-mini-2024", 1))
    gateway: Gateway = await start_gateway(catalog_extra=extra)
    async with gateway.client(api_key) as client:
        for model in ("ha-503", "ha-dead"):
            for stream in (False, True):
                reply = await client.chat.completions.create(
                    model=model, messages=MESSAGES, stream=stream)
                if stream:
                    [c async for c in reply]  # type: ignore[union-attr]
        # OpenRouter-style fallback models.
        await client.chat.completions.create(
            model="unreachable", messages=MESSAGES, extra_body={"models": ["demo-mini"]})
    events = await gateway.events(5)
    assert [(e.status, e.attempts, e.provider) for e in events] == [(200, 2, "mock")] * 5
    assert events[-1].requested_model == "unreachable"
    assert len(flaky.requests) == 2


async def test_no_retry_once_the_first_byte_is_sent(
    start_gateway: GatewayFactory, api_key: str, mock_anthropic: MockAnthropicUpstream,
    mock_upstream: MockOpenAIUpstream,
) -> None:
    gateway: Gateway = await start_gateway(catalog_extra=_model(
        "ha-claude", ("claude", "claude-demo-haiku", FIRST), ("mock", "demo-mini-2024", 1)))
    mock_anthropic.behaviour.error_after = 2
    root = gateway.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as s, s.post(
        f"{root}/v1/messages", headers={"x-api-key": api_key, "anthropic-version": "2023-06-01"},
        json={"model": "ha-claude", "max_tokens": 50, "stream": True, "messages": MESSAGES},
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    assert raw.count(b"event: content_block_delta") == 2 and b"event: error" in raw
    assert mock_upstream.requests == []
    [event] = await gateway.events(1)
    assert (event.attempts, event.outcome) == (1, "upstream_error")
    assert event.prompt_tokens > 0 and event.completion_tokens >= 2


async def test_a_failing_deployment_is_ejected_and_comes_back(
    start_gateway: GatewayFactory, api_key: str, flaky: MockOpenAIUpstream,
) -> None:
    gateway: Gateway = await start_gateway(
        catalog_extra=_flaky_provider(flaky) + _model(
            "ej", ("flaky", "x", FIRST), ("mock", "demo-mini-2024", 1)),
        QNP_EJECT_AFTER="2", QNP_EJECT_BASE_SECONDS="0.5")
    async with gateway.client(api_key) as client:
        for _ in range(3):
            await client.chat.completions.create(model="ej", messages=MESSAGES)
        assert len(flaky.requests) == 2, "ejected after two failures in a row"
        await asyncio.sleep(0.6)  # the ejection interval, shortened for the test
        await client.chat.completions.create(model="ej", messages=MESSAGES)
    assert len(flaky.requests) == 3, "back in rotation after its interval"
    events = await gateway.events(4)
    assert [e.attempts for e in events] == [2, 2, 1, 2]


async def test_the_retry_budget_holds_under_a_fully_failing_upstream(
    start_gateway: GatewayFactory, api_key: str, flaky: MockOpenAIUpstream,
) -> None:
    flaky.behaviour.first_byte_delay = 0.2  # so the requests overlap
    gateway: Gateway = await start_gateway(
        catalog_extra=_flaky_provider(flaky) + _model(
            "down", ("flaky", "a", 1), ("flaky", "b", 1), ("flaky", "c", 1), ("flaky", "d", 1)))
    requests = 40
    async with gateway.client(api_key) as client:
        results = await asyncio.gather(*(
            client.chat.completions.create(model="down", messages=MESSAGES)
            for _ in range(requests)), return_exceptions=True)
    assert all(getattr(r, "status_code", None) == 502 for r in results)
    # Without a budget: 4 attempts each (160). Retries in flight ≤ 20 % of 40 = 8.
    assert requests < len(flaky.requests) <= requests + 2 * 8
    events = await gateway.events(requests)
    assert sum(e.attempts for e in events) == len(flaky.requests)


@pytest.mark.parametrize("where", ["headers", "first_chunk"])
async def test_keepalive_comments_while_the_first_token_is_slow(
    start_gateway: GatewayFactory, api_key: str, mock_anthropic: MockAnthropicUpstream,
    where: str,
) -> None:
    # The 40 s wait, shortened: first token after 0.4 s, keep-alive every 0.05 s.
    gateway: Gateway = await start_gateway(QNP_KEEPALIVE_INTERVAL="0.05")
    setattr(mock_anthropic.behaviour, f"first_{'byte' if where == 'headers' else 'chunk'}_delay",
            0.4)
    root = gateway.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as s, s.post(
        f"{root}/v1/messages", headers={"x-api-key": api_key},
        json={"model": "claude-demo", "max_tokens": 50, "stream": True, "messages": MESSAGES},
    ) as resp:
        raw = await resp.read()
    head, _, rest = raw.partition(b"event: message_start")
    assert head.count(b": keep-alive\n\n") >= 1 and head.replace(b": keep-alive\n\n", b"") == b""
    assert b"event: message_stop" in rest
    async with gateway.anthropic(api_key) as client:
        async with client.messages.stream(model="claude-demo", max_tokens=50,
                                          messages=MESSAGES) as stream:
            text = "".join([t async for t in stream.text_stream])
    assert text == mock_anthropic.behaviour.reply
    events = await gateway.events(2)
    assert all(e.outcome == "ok" and e.usage_source == "upstream" for e in events)


async def test_an_idle_stream_ends_with_an_error_in_the_clients_format(
    start_gateway: GatewayFactory, api_key: str, mock_anthropic: MockAnthropicUpstream,
) -> None:
    gateway: Gateway = await start_gateway(QNP_READ_TIMEOUT="0.3")
    mock_anthropic.behaviour.stall_after = 3
    async with aiohttp.ClientSession() as s, s.post(
        f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "claude-demo", "stream": True, "messages": MESSAGES},
    ) as resp:
        raw = await resp.read()
    assert raw.rstrip().endswith(b'"code":"stream_idle_timeout"}}')
    [event] = await gateway.events(1)
    assert (event.outcome, event.error_code) == ("timeout", "stream_idle_timeout")
    # What passed through is recorded: the input side from message_start, 3 pieces out.
    assert event.usage_source == "estimated" and event.completion_tokens >= 3
    assert event.prompt_tokens > 0 and event.cost_micros > 0


async def _wait_for(condition: Any, deadline: float) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return bool(condition())


@pytest.mark.parametrize("when", ["mid_stream", "before_first_byte"])
async def test_a_client_leaving_cancels_the_upstream_within_a_second(
    gateway: Gateway, api_key: str, mock_anthropic: MockAnthropicUpstream, when: str,
) -> None:
    if when == "mid_stream":
        mock_anthropic.behaviour.chunks, mock_anthropic.behaviour.chunk_delay = 400, 0.01
    else:
        mock_anthropic.behaviour.first_byte_delay = 30
    async with gateway.anthropic(api_key) as client:
        async def partial() -> None:
            async with client.messages.stream(model="claude-demo", max_tokens=1000,
                                              messages=MESSAGES) as stream:
                got = 0
                async for _ in stream.text_stream:
                    got += 1
                    if got == 5:
                        return

        task = asyncio.create_task(partial())
        if when == "before_first_byte":
            assert await _wait_for(lambda: mock_anthropic.requests, 5)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        left = time.monotonic()
    assert await _wait_for(lambda: mock_anthropic.disconnects, 1.0), \
        "upstream still generating 1 s after the client left"
    assert mock_anthropic.disconnects[0] - left < 1.0
    [event] = await gateway.events(1)
    assert event.outcome == "client_cancelled"
    if when == "mid_stream":
        assert event.usage_source == "estimated" and event.completion_tokens >= 5
        assert event.prompt_tokens == mock_anthropic.reported_usage[0]["input_tokens"]
