"""The benchmark mock upstream speaks each provider's wire format well enough for the
official SDKs, honours the scenario a model name asks for, refuses a wrong key in each
provider's error format, serves from several processes, and stops with them all.

No wall-clock thresholds: pacing is checked by the order things arrive in.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from tests.support import ModuleProcess, free_port, process_gone, wait_until_gone

KEY = "sk-bench-mock"
READY = "mock_upstream ready on http://127.0.0.1:"
HI = [{"role": "user", "content": "Hello there, mock!"}]


def start_mock(log: Path, *args: str) -> tuple[ModuleProcess, str]:
    port = free_port()
    proc = ModuleProcess("benchmarks.mock_upstream",
                         ["--port", str(port), "--api-key", KEY, *args], log_path=log)
    proc.wait_for_log(READY)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of one mock, its defaults left as they are (20 chunks of 1 token)."""
    proc, url = start_mock(tmp_path_factory.mktemp("mock") / "mock.log")
    with proc:
        yield url


class BodyRecorder:
    """Keeps the request bodies an SDK sends, to work out the prompt tokens expected."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, request: Any) -> None:  # the SDKs' own httpx request
        self.bodies.append(request.content)

    def prompt_tokens(self) -> int:
        return max(1, len(self.bodies[-1]) // 4)


def openai_client(base: str, recorder: BodyRecorder, key: str = KEY) -> openai.AsyncOpenAI:
    http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [recorder]})
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0,
                              http_client=http)


async def test_openai_sdk_reads_a_completion_with_the_model_names_shape(mock: str) -> None:
    recorder = BodyRecorder()
    async with openai_client(mock, recorder) as client:
        reply = await client.chat.completions.create(model="mock-chunks7-tpc3", messages=HI)
    content = reply.choices[0].message.content
    assert content is not None and content.split() == ["tok"] * 21
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        recorder.prompt_tokens(), 21)
    assert reply.model == "mock-chunks7-tpc3"


async def test_openai_sdk_streams_with_and_without_the_usage_chunk(mock: str) -> None:
    recorder = BodyRecorder()
    async with openai_client(mock, recorder) as client:
        with_usage = [c async for c in await client.chat.completions.create(
            model="mock-chunks4-tpc2", messages=HI, stream=True,
            stream_options={"include_usage": True})]
        without = [c async for c in await client.chat.completions.create(
            model="mock-chunks4-tpc2", messages=HI, stream=True)]
    for chunks in (with_usage, without):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.split() == ["tok"] * 8
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = with_usage[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        max(1, len(recorder.bodies[0]) // 4), 8)
    assert all(c.usage is None for c in with_usage[:-1] + without)


async def test_anthropic_sdk_reads_a_message_and_a_stream(mock: str) -> None:
    recorder = BodyRecorder()
    http = anthropic.DefaultAsyncHttpxClient(event_hooks={"request": [recorder]})
    async with anthropic.AsyncAnthropic(base_url=mock, api_key=KEY, max_retries=0,
                                        http_client=http) as client:
        message = await client.messages.create(model="mock-chunks5-tpc2", max_tokens=64,
                                               messages=HI)  # type: ignore[arg-type]
        prompt = recorder.prompt_tokens()
        async with client.messages.stream(model="mock-chunks3", max_tokens=64,
                                          messages=HI) as stream:  # type: ignore[arg-type]
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert message.content[0].text.split() == ["tok"] * 10  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (prompt, 10)
    assert text.split() == ["tok"] * 3
    assert final.usage.output_tokens == 3
    assert final.usage.input_tokens == recorder.prompt_tokens()
    assert final.stop_reason == "end_turn"


def sse_data(body: bytes) -> list[dict[str, object]]:
    return [orjson.loads(line[len(b"data: "):])
            for event in body.split(b"\r\n\r\n") for line in event.splitlines()
            if line.startswith(b"data: ")]


async def test_gemini_generate_and_stream_with_usage_metadata(mock: str) -> None:
    body = orjson.dumps({"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]})
    prompt = max(1, len(body) // 4)
    base = f"{mock}/v1beta/models/mock-chunks6-tpc2"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}:generateContent", data=body,
                                headers={"x-goog-api-key": KEY}) as response:
            assert response.status == 200
            whole = await response.json()
        async with session.post(f"{base}:streamGenerateContent?alt=sse&key={KEY}",
                                data=body) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            raw = await response.read()
    candidate = whole["candidates"][0]
    assert candidate["content"]["parts"][0]["text"].split() == ["tok"] * 12
    assert candidate["finishReason"] == "STOP"
    assert whole["usageMetadata"]["promptTokenCount"] == prompt
    assert whole["usageMetadata"]["candidatesTokenCount"] == 12
    events = sse_data(raw)
    assert len(events) == 6 and raw.endswith(b"\r\n\r\n")
    texts = "".join(e["candidates"][0]["content"]["parts"][0]["text"]  # type: ignore[index]
                    for e in events)
    assert texts.split() == ["tok"] * 12
    assert events[-1]["usageMetadata"] == {"promptTokenCount": prompt,
                                           "candidatesTokenCount": 12,
                                           "totalTokenCount": prompt + 12}
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"  # type: ignore[index]


async def test_a_wrong_key_gets_401_in_each_providers_format(mock: str) -> None:
    async with openai_client(mock, BodyRecorder(), key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(model="mock", messages=HI)
    assert refused.value.status_code == 401
    assert isinstance(refused.value.body, dict) and refused.value.body["message"]
    async with anthropic.AsyncAnthropic(base_url=mock, api_key="sk-wrong",
                                        max_retries=0) as claude:
        with pytest.raises(anthropic.AuthenticationError) as rejected:
            await claude.messages.create(model="mock", max_tokens=8,
                                         messages=HI)  # type: ignore[arg-type]
    assert rejected.value.status_code == 401
    assert rejected.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": "invalid x-api-key"}}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{mock}/v1beta/models/mock:generateContent?key=sk-wrong",
                                json={"contents": []}) as response:
            assert response.status == 401
            error = (await response.json())["error"]
        async with session.get(f"{mock}/v1/models") as response:
            assert response.status == 401
        async with session.get(f"{mock}/v1/models",
                               headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert response.status == 200
            assert (await response.json())["object"] == "list"
    assert (error["code"], error["status"]) == (401, "UNAUTHENTICATED")


def raw_request(path: str, body: dict[str, object]) -> bytes:
    data = orjson.dumps(body)
    return (f"POST {path} HTTP/1.1\r\nHost: mock\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode() + data


async def test_a_delayed_stream_arrives_one_chunk_per_read(mock: str) -> None:
    port = int(mock.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw_request("/v1/chat/completions", {
            "model": "mock-chunks3-delay250", "messages": HI, "stream": True}))
        reads: list[bytes] = []
        while not b"".join(reads).endswith(b"0\r\n\r\n"):
            reads.append(await reader.read(65536))
            assert reads[-1], b"".join(reads)
    finally:
        writer.close()
        await writer.wait_closed()
    with_content = [r for r in reads if b'"tok "' in r]
    assert [r.count(b'"tok "') for r in with_content] == [1, 1, 1]
    assert b"data: [DONE]" in reads[-1]


async def test_a_slow_first_token_is_overtaken_by_a_fast_reply(mock: str) -> None:
    arrivals: list[str] = []

    async def ask(name: str, model: str) -> None:
        async with session.post(f"{mock}/v1/chat/completions", headers=auth,
                                json={"model": model, "messages": HI, "stream": True}) as r:
            await r.content.readany()
            arrivals.append(name)
            await r.read()

    auth = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(ask("slow", "mock-ttft400-chunks2"))
        await asyncio.sleep(0.05)  # the slow request is sent first
        await ask("fast", "mock-chunks2")
        await slow
    assert arrivals == ["fast", "slow"]


async def test_pipelined_requests_are_answered_in_order(mock: str) -> None:
    port = int(mock.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw_request("/v1/chat/completions", {
            "model": "mock-chunks2-delay20", "messages": HI, "stream": True})
            + raw_request("/v1/chat/completions", {"model": "mock-chunks1", "messages": HI}))
        data = b""
        while b'"object":"chat.completion"' not in data or not data.endswith(b"}"):
            chunk = await reader.read(65536)
            assert chunk, data
            data += chunk
    finally:
        writer.close()
        await writer.wait_closed()
    assert data.index(b"data: [DONE]") < data.index(b'"object":"chat.completion"')


async def test_200_paced_streams_at_once_all_complete(mock: str) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def stream() -> bytes:
            async with session.post(f"{mock}/v1/messages", headers={"x-api-key": KEY}, json={
                    "model": "mock-chunks10-delay10", "max_tokens": 64, "messages": HI,
                    "stream": True}) as response:
                assert response.status == 200
                return await response.read()

        bodies = await asyncio.gather(*(stream() for _ in range(200)))
    for body in bodies:
        assert body.count(b"event: content_block_delta") == 10
        assert body.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


async def test_a_slow_reader_still_gets_every_byte(mock: str) -> None:
    # ~7 MB in 0.1 ms steps: the mock outpaces this reader, so it must pause and resume.
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{mock}/v1/chat/completions",
                                headers={"Authorization": f"Bearer {KEY}"},
                                json={"model": "mock-chunks300-tpc5000-delay0.1",
                                      "messages": HI, "stream": True}) as response:
            received = []
            async for data in response.content.iter_chunked(65536):
                received.append(data)
                await asyncio.sleep(0.002)
    body = b"".join(received)
    assert body.count(b'"tok ') == 300 and body.count(b"tok ") == 300 * 5000
    assert body.endswith(b"data: [DONE]\n\n")


def test_two_processes_serve_and_sigterm_stops_them_all(tmp_path: Path) -> None:
    proc, url = start_mock(tmp_path / "mock.log", "--processes", "2")
    with proc:
        pids = set()
        for _ in range(40):  # new connections: the kernel spreads them by source port
            request = urllib.request.Request(f"{url}/healthz", headers={"Connection": "close"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
                pids.add(int(response.headers["x-mock-pid"]))
        assert len(pids) == 2 and proc.pid not in pids
        assert proc.log_text().count("mock_upstream ready") == 1
        assert proc.stop(signal.SIGTERM) == 0
    assert all(wait_until_gone(pid) for pid in pids)
    assert process_gone(proc.pid)


async def test_a_client_expecting_100_continue_gets_it_before_sending_the_body(
        mock: str) -> None:
    port = int(mock.rsplit(":", 1)[1])
    body = orjson.dumps({"model": "mock-chunks2", "messages": HI})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\n"
                     f"Authorization: Bearer {KEY}\r\nExpect: 100-continue\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
        await writer.wait_closed()
