"""The mock OpenAI upstream, driven by the official openai SDK where it can be."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from devstack.upstream_openai import (
    MockOpenAIUpstream,
    count_prompt_tokens,
    expected_usage,
)
from tests.conftest import UPSTREAM_API_KEY
from tests.support import ModuleProcess, free_port, wait_for_http

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the gateway tests, please."},
]


@pytest.fixture
async def client(mock_upstream: MockOpenAIUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=mock_upstream.base_url, api_key=UPSTREAM_API_KEY, max_retries=0
    ) as sdk:
        yield sdk


async def test_completion_carries_reply_and_usage(
    client: openai.AsyncOpenAI, mock_upstream: MockOpenAIUpstream
) -> None:
    mock_upstream.behaviour.reply = "One two three four."
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == "One two three four."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4
    assert completion.usage.prompt_tokens == count_prompt_tokens(MESSAGES)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 4
    assert completion.usage.model_dump(exclude_none=True) == expected_usage(
        {"messages": MESSAGES}, mock_upstream.behaviour
    )
    [request] = mock_upstream.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {UPSTREAM_API_KEY}"
    assert request.body["messages"] == MESSAGES


async def test_stream_ends_with_a_usage_chunk_when_asked(
    client: openai.AsyncOpenAI, mock_upstream: MockOpenAIUpstream
) -> None:
    mock_upstream.behaviour.chunks = 7
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    *content_chunks, last = chunks
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in content_chunks)
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 7
    assert last.usage.prompt_tokens == count_prompt_tokens(MESSAGES)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert len(text.split()) == 7
    assert mock_upstream.requests[0].body["stream_options"] == {"include_usage": True}


async def test_stream_without_include_usage_has_no_usage_chunk(
    client: openai.AsyncOpenAI, mock_upstream: MockOpenAIUpstream
) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (
        mock_upstream.behaviour.reply
    )


async def test_wrong_api_key_is_refused(mock_upstream: MockOpenAIUpstream) -> None:
    async with openai.AsyncOpenAI(
        base_url=mock_upstream.base_url, api_key="sk-wrong", max_retries=0
    ) as sdk:
        with pytest.raises(openai.AuthenticationError) as refused:
            await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert refused.value.status_code == 401
    assert refused.value.code == "invalid_api_key"


async def test_forced_errors_look_like_openai_errors(
    client: openai.AsyncOpenAI, mock_upstream: MockOpenAIUpstream
) -> None:
    mock_upstream.behaviour.error_status = 429
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    mock_upstream.behaviour.error_status = 500
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    mock_upstream.behaviour.error_status = None
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.choices[0].message.content == mock_upstream.behaviour.reply


async def test_bad_requests_get_openai_error_json(mock_upstream: MockOpenAIUpstream) -> None:
    headers = {"Authorization": f"Bearer {UPSTREAM_API_KEY}"}
    url = f"{mock_upstream.base_url}/chat/completions"
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(url, data=b"{not json") as response:
            assert response.status == 400
            error = (await response.json())["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
        async with session.post(url, json={"model": "gpt-4o-mini"}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "messages"


async def test_lists_models(client: openai.AsyncOpenAI) -> None:
    models = [model.id async for model in client.models.list()]
    assert "gpt-4o-mini" in models


async def test_nothing_is_sent_before_the_first_byte_delay(
    mock_upstream: MockOpenAIUpstream,
) -> None:
    mock_upstream.behaviour.first_byte_delay = 5.0
    headers = {"Authorization": f"Bearer {UPSTREAM_API_KEY}"}
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession(headers=headers) as session:
        request = asyncio.ensure_future(
            session.post(f"{mock_upstream.base_url}/chat/completions", json=body)
        )
        # Wait until the mock holds the request, then check no response head came back.
        while not mock_upstream.requests:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert not request.done()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request


async def test_client_leaving_mid_stream_is_quiet(
    client: openai.AsyncOpenAI,
    mock_upstream: MockOpenAIUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mock_upstream.behaviour.chunks = 50
    mock_upstream.behaviour.chunk_delay = 0.02
    caplog.set_level(logging.DEBUG)
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    async for _chunk in stream:
        break
    await stream.close()
    # The mock keeps serving after the disconnect, without an error logged.
    mock_upstream.behaviour.chunks = None
    mock_upstream.behaviour.chunk_delay = 0
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.choices[0].message.content == mock_upstream.behaviour.reply
    await asyncio.sleep(0.1)  # let the abandoned handler hit the closed connection
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_standalone_module_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    args = ["--port", str(port), "--api-key", "sk-standalone"]
    with ModuleProcess("devstack.upstream_openai", args, log_path=tmp_path / "up.log") as proc:
        base_url = f"http://127.0.0.1:{port}/v1"
        assert await wait_for_http(f"{base_url}/models") == 401
        async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-standalone") as sdk:
            completion = await sdk.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
            )
        assert completion.usage is not None
        assert proc.stop(signal.SIGTERM) == 0
    assert "Traceback" not in proc.log_text()
    assert f"listening on {base_url}" in proc.log_text()
