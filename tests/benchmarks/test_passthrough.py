"""The bare passthrough, the benchmarks' bar, relays every provider's answer byte for
byte, works for the openai SDK, turns an unreachable upstream into a 502, and runs as
several workers that stop together."""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import psutil
import pytest

from tests.support import ModuleProcess, free_port, wait_until_gone

KEY = "sk-bench-mock"
HI = [{"role": "user", "content": "Hello there, passthrough!"}]


def start(module: str, log: Path, ready: str, *args: str) -> tuple[ModuleProcess, str]:
    port = free_port()
    proc = ModuleProcess(module, ["--port", str(port), *args], log_path=log)
    proc.wait_for_log(ready)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``(mock, passthrough)`` base URLs, the passthrough in front of the mock."""
    logs = tmp_path_factory.mktemp("passthrough")
    mock, mock_url = start("benchmarks.mock_upstream", logs / "mock.log",
                           "mock_upstream ready on", "--api-key", KEY)
    with mock:
        relay, relay_url = start("benchmarks.passthrough", logs / "passthrough.log",
                                 "passthrough ready on", "--upstream", mock_url)
        with relay:
            yield mock_url, relay_url


async def test_openai_sdk_works_through_the_passthrough(servers: tuple[str, str]) -> None:
    _, relay = servers
    async with openai.AsyncOpenAI(base_url=f"{relay}/v1", api_key=KEY,
                                  max_retries=0) as client:
        reply = await client.chat.completions.create(model="mock-chunks5", messages=HI)
        chunks = [c async for c in await client.chat.completions.create(
            model="mock-chunks5-delay5", messages=HI, stream=True,
            stream_options={"include_usage": True})]
    assert reply.choices[0].message.content == "tok " * 5
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok " * 5
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


CALLS = [
    ("/v1/chat/completions", {"model": "mock-chunks4", "messages": HI}),
    ("/v1/chat/completions", {"model": "mock-chunks4-delay5", "messages": HI, "stream": True,
                              "stream_options": {"include_usage": True}}),
    ("/v1/messages", {"model": "mock-chunks4", "max_tokens": 16, "messages": HI,
                      "stream": True}),
    ("/v1beta/models/mock-chunks4:streamGenerateContent?alt=sse",
     {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}),
]


@pytest.mark.parametrize(("path", "body"), CALLS, ids=["openai", "openai-stream",
                                                      "anthropic-stream", "gemini-stream"])
async def test_bodies_are_byte_identical_to_calling_the_mock_directly(
        servers: tuple[str, str], path: str, body: dict[str, object]) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "x-api-key": KEY, "x-goog-api-key": KEY}
    answers = []
    async with aiohttp.ClientSession() as session:
        for base in servers:
            async with session.post(base + path, json=body, headers=headers) as response:
                answers.append((response.status, response.headers["Content-Type"],
                                await response.read()))
    direct, relayed = answers
    assert direct[0] == 200 and b"tok " in direct[2]
    assert relayed == direct


async def test_upstream_errors_come_back_with_their_status(servers: tuple[str, str]) -> None:
    _, relay = servers
    async with openai.AsyncOpenAI(base_url=f"{relay}/v1", api_key="sk-wrong",
                                  max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="mock", messages=HI)


async def test_an_unreachable_upstream_is_a_502_not_a_hang(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    relay, url = start("benchmarks.passthrough", tmp_path / "passthrough.log",
                       "passthrough ready on", "--upstream", nowhere)
    with relay:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.post(f"{url}/v1/chat/completions",
                                    json={"model": "mock", "messages": HI}) as response:
                assert response.status == 502
                assert "error" in await response.json()


def test_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    relay, url = start("benchmarks.passthrough", tmp_path / "passthrough.log",
                       "passthrough ready on", "--upstream", "http://127.0.0.1:9",
                       "--workers", "2")
    with relay:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            assert response.status == 200
        workers = [child.pid for child in psutil.Process(relay.pid).children()]
        assert len(workers) == 2
        assert relay.stop(signal.SIGTERM) == 0
    assert all(wait_until_gone(pid) for pid in workers)
