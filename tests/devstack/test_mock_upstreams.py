"""The Anthropic and Gemini mocks speak the real wire formats: the official anthropic
SDK reads the Anthropic mock unmodified, and the Gemini mock's SSE follows Google's."""

from __future__ import annotations

import aiohttp
import anthropic
import orjson

from devstack.mock_server import MockBehaviour
from devstack.upstream_anthropic import MockAnthropicUpstream
from devstack.upstream_gemini import MockGeminiUpstream


async def test_anthropic_sdk_reads_the_mock_stream_and_reply() -> None:
    behaviour = MockBehaviour(api_key="k", cache_read_tokens=5, cache_write_tokens=2)
    async with MockAnthropicUpstream(behaviour=behaviour) as up:
        client = anthropic.AsyncAnthropic(base_url=up.base_url.removesuffix("/v1"),
                                          api_key="k", max_retries=0)
        async with client:
            msg = await client.messages.create(
                model="claude-demo-haiku", max_tokens=100,
                messages=[{"role": "user", "content": "Hi"}])
            async with client.messages.stream(
                model="claude-demo-haiku", max_tokens=100,
                messages=[{"role": "user", "content": "Hi"}]) as stream:
                text = "".join([t async for t in stream.text_stream])
                final = await stream.get_final_message()
    assert msg.content[0].text == text == behaviour.reply  # type: ignore[union-attr]
    assert final.usage.output_tokens == msg.usage.output_tokens == up.reported_usage[0][
        "output_tokens"]
    assert final.usage.cache_read_input_tokens == 5


async def test_gemini_mock_streams_sse_with_crlf_and_final_usage() -> None:
    async with MockGeminiUpstream(behaviour=MockBehaviour(api_key="g")) as up, \
            aiohttp.ClientSession() as s:
        url = f"{up.base_url}/models/gemini-demo-flash:streamGenerateContent?alt=sse&key=g"
        body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
        async with s.post(url, json=body) as resp:
            raw = await resp.read()
        async with s.post(url.replace("&key=g", ""), json=body) as refused:
            assert refused.status == 401
    events = [orjson.loads(e.removeprefix(b"data: ")) for e in raw.split(b"\r\n\r\n") if e]
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert events[-1]["usageMetadata"] == up.reported_usage[0]
