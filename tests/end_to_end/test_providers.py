"""Every provider end to end: canaries through every wire format and error path, and
usage rows that bill exactly what each mock upstream reported, at catalog prices.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import orjson
import pytest
import redis.asyncio as aioredis

from devstack.mock_server import MockBehaviour
from devstack.upstream_anthropic import MockAnthropicUpstream
from devstack.upstream_gemini import MockGeminiUpstream
from devstack.upstream_openai import MockOpenAIUpstream, UpstreamBehaviour, expected_usage
from tests.end_to_end.conftest import UPSTREAM_KEY, Stack, _assert_nowhere, _rows

PRICES = {
    "demo-mini": {"prompt": 150_000, "completion": 600_000},
    "claude-demo": {"prompt": 800_000, "completion": 4_000_000, "read": 80_000,
                    "write": 1_000_000},
    "gemini-demo": {"prompt": 100_000, "completion": 400_000, "read": 25_000,
                    "reasoning": 700_000},
}
BILLED = ("provider", "stream", "usage_source", "prompt_tokens", "completion_tokens",
          "cached_tokens", "cache_write_tokens", "reasoning_tokens", "cost_micros")


def _ceil_micros(total: int) -> int:
    return -(-total // 1_000_000)


def _openai_row(u: dict[str, Any], stream: bool) -> dict[str, object]:
    p = PRICES["demo-mini"]
    return {"provider": "mock", "stream": stream, "usage_source": "upstream",
            "prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "cached_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0,
            "cost_micros": _ceil_micros(u["prompt_tokens"] * p["prompt"]
                                        + u["completion_tokens"] * p["completion"])}


def _claude_row(u: dict[str, Any], stream: bool) -> dict[str, object]:
    """Anthropic counts input, cache-read and cache-write tokens apart; the row's
    prompt_tokens is their sum, each part billed at its own price."""
    p = PRICES["claude-demo"]
    read, write = u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
    return {"provider": "claude", "stream": stream, "usage_source": "upstream",
            "prompt_tokens": u["input_tokens"] + read + write,
            "completion_tokens": u["output_tokens"], "cached_tokens": read,
            "cache_write_tokens": write, "reasoning_tokens": 0,
            "cost_micros": _ceil_micros(u["input_tokens"] * p["prompt"] + read * p["read"]
                                        + write * p["write"]
                                        + u["output_tokens"] * p["completion"])}


def _gemini_row(u: dict[str, Any], stream: bool) -> dict[str, object]:
    """Gemini's prompt count includes the cached tokens; thinking tokens are billed as
    output at the reasoning price but are not part of candidatesTokenCount."""
    p = PRICES["gemini-demo"]
    cached, thoughts = u.get("cachedContentTokenCount", 0), u.get("thoughtsTokenCount", 0)
    return {"provider": "google", "stream": stream, "usage_source": "upstream",
            "prompt_tokens": u["promptTokenCount"],
            "completion_tokens": u["candidatesTokenCount"] + thoughts,
            "cached_tokens": cached, "cache_write_tokens": 0, "reasoning_tokens": thoughts,
            "cost_micros": _ceil_micros((u["promptTokenCount"] - cached) * p["prompt"]
                                        + cached * p["read"]
                                        + u["candidatesTokenCount"] * p["completion"]
                                        + thoughts * p["reasoning"])}


async def _funded_key(stack: Stack, name: str) -> tuple[str, str]:
    """(account id, API key) of a new account credited $5 through the admin API."""
    account = await stack.admin("POST", "/admin/accounts", {"name": name})
    await stack.admin("POST", f"/admin/accounts/{account['id']}/credit",
                      {"amount_micros": 5_000_000})
    issued = await stack.admin("POST", f"/admin/accounts/{account['id']}/keys", {"name": "k"})
    return str(account["id"]), str(issued["key"])


def _clients(stack: Stack, key: str) -> tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]:
    return (openai.AsyncOpenAI(base_url=stack.proxy_url, api_key=key, max_retries=0),
            anthropic.AsyncAnthropic(base_url=stack.root, api_key=key, max_retries=0))


async def _openai_stream(client: openai.AsyncOpenAI, got: list[str], model: str,
                         messages: Any, **kw: Any) -> None:
    async for chunk in await client.chat.completions.create(
            model=model, messages=messages, stream=True, **kw):
        got.extend(c.delta.content or "" for c in chunk.choices)


async def _anthropic_stream(client: anthropic.AsyncAnthropic, got: list[str], model: str,
                            messages: Any, leave_after: int | None = None) -> None:
    async with client.messages.stream(model=model, max_tokens=1000,
                                      messages=messages) as stream:
        async for text in stream.text_stream:
            got.append(text)
            if leave_after is not None and len(got) >= leave_after:
                return  # closes the connection mid-stream


async def _gemini_native(stack: Stack, key: str, prompt: str, stream: bool
                         ) -> tuple[int, bytes]:
    action = "streamGenerateContent?alt=sse" if stream else "generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
    async with aiohttp.ClientSession() as s, s.post(
        f"{stack.root}/v1beta/models/gemini-demo:{action}", json=body,
        headers={"x-goog-api-key": key},
    ) as resp:
        return resp.status, await resp.read()


async def test_every_provider_and_error_path_keeps_no_content(
    stack: Stack, migrated_url: str, redis: aioredis.Redis, mock_upstream: MockOpenAIUpstream,
    mock_anthropic: MockAnthropicUpstream, mock_gemini: MockGeminiUpstream,
    flaky: MockOpenAIUpstream,
) -> None:
    prompt = "CANARY-PROMPT-" + secrets.token_hex(12)
    replies = {name: f"CANARY-{name.upper()}-{secrets.token_hex(12)}"
               for name in ("openai", "claude", "gemini")}

    def reset() -> None:
        """Every mock back to answering normally, each reply opening with its canary."""
        mock_upstream.behaviour = UpstreamBehaviour(
            api_key=UPSTREAM_KEY, reply=f"{replies['openai']} and then some more words.")
        for mock, name in ((mock_anthropic, "claude"), (mock_gemini, "gemini")):
            mock.behaviour = MockBehaviour(
                api_key=UPSTREAM_KEY, reply=f"{replies[name]} and then some more words.")

    reset()
    account_id, key = await _funded_key(stack, "canaries")
    messages: Any = [{"role": "user", "content": f"Repeat {prompt} please."}]
    seen: dict[str, str] = {}  # what each request showed its client
    oai, claude = _clients(stack, key)
    async with oai, claude:
        # Every provider, in every client format, stream and not.
        done = await claude.messages.create(model="claude-demo", max_tokens=100,
                                            messages=messages)
        seen["claude via messages"] = done.content[0].text  # type: ignore[union-attr]
        got: list[str] = []
        await _anthropic_stream(claude, got, "claude-demo", messages)
        seen["claude via messages, streamed"] = "".join(got)
        got = []
        await _openai_stream(oai, got, "claude-demo", messages)
        seen["claude via chat, streamed"] = "".join(got)
        plain = await oai.chat.completions.create(model="gemini-demo", messages=messages)
        seen["gemini via chat"] = plain.choices[0].message.content or ""
        got = []
        await _openai_stream(oai, got, "gemini-demo", messages)
        seen["gemini via chat, streamed"] = "".join(got)
        for stream in (False, True):
            status, raw = await _gemini_native(stack, key, f"Repeat {prompt} please.", stream)
            assert status == 200
            seen[f"gemini native{', streamed' if stream else ''}"] = raw.decode()
        # Fallback: the first deployment answers 503, the second serves.
        plain = await oai.chat.completions.create(model="ha-demo", messages=messages)
        seen["fallback"] = plain.choices[0].message.content or ""
        got = []
        await _openai_stream(oai, got, "ha-demo", messages)
        seen["fallback, streamed"] = "".join(got)

        # Upstream refusals, each rendered in the client's own format.
        mock_anthropic.behaviour.error_status = 400
        with pytest.raises(anthropic.BadRequestError):
            await claude.messages.create(model="claude-demo", max_tokens=100,
                                         messages=messages)
        with pytest.raises(openai.BadRequestError):
            await oai.chat.completions.create(model="claude-demo", messages=messages)
        mock_gemini.behaviour.error_status = 400
        with pytest.raises(openai.BadRequestError):
            await oai.chat.completions.create(model="gemini-demo", messages=messages)
        status, raw = await _gemini_native(stack, key, f"Repeat {prompt} please.", False)
        assert status == 400 and orjson.loads(raw)["error"]["status"] == "INVALID_ARGUMENT"
        mock_upstream.behaviour.error_status = 400
        with pytest.raises(anthropic.BadRequestError):
            await claude.messages.create(model="demo-mini", max_tokens=100, messages=messages)
        reset()

        # Errors after the first byte: an upstream error event, then an idle upstream.
        mock_anthropic.behaviour.error_after = 2
        got = []
        with pytest.raises(anthropic.APIError):
            await _anthropic_stream(claude, got, "claude-demo", messages)
        seen["claude error event"] = "".join(got)
        mock_gemini.behaviour.error_after = 2
        got = []
        with pytest.raises(openai.APIError):
            await _openai_stream(oai, got, "gemini-demo", messages)
        seen["gemini error event"] = "".join(got)
        mock_anthropic.behaviour = MockBehaviour(
            api_key=UPSTREAM_KEY, reply=mock_anthropic.behaviour.reply, stall_after=3)
        got = []
        with pytest.raises(openai.APIError, match="stopped sending"):
            await _openai_stream(oai, got, "claude-demo", messages)
        seen["claude idle"] = "".join(got)

        # A client that leaves mid-stream.
        reset()
        mock_anthropic.behaviour.chunks, mock_anthropic.behaviour.chunk_delay = 400, 0.01
        got = []
        await _anthropic_stream(claude, got, "claude-demo", messages, leave_after=5)
        seen["claude cancelled"] = "".join(got)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5  # hang guard
        while not mock_anthropic.disconnects:
            assert loop.time() < deadline, "the upstream never saw the client leave"
            await asyncio.sleep(0.02)

    # The canaries did reach the clients, on every path that had a reply to give.
    for path, text in seen.items():
        provider = "openai" if path.startswith("fallback") else path.split()[0]
        assert replies[provider] in text, f"{path}: no reply canary in {text[:200]!r}"

    chat, messages_ep, gemini_ep = ("/v1/chat/completions", "/v1/messages",
                                    "/v1beta/models:generateContent")
    expected = [
        (messages_ep, 200, "ok", 1), (messages_ep, 200, "ok", 1), (chat, 200, "ok", 1),
        (chat, 200, "ok", 1), (chat, 200, "ok", 1), (gemini_ep, 200, "ok", 1),
        (gemini_ep, 200, "ok", 1), (chat, 200, "ok", 2), (chat, 200, "ok", 2),
        (messages_ep, 400, "upstream_error", 1), (chat, 400, "upstream_error", 1),
        (chat, 400, "upstream_error", 1), (gemini_ep, 400, "upstream_error", 1),
        (messages_ep, 400, "upstream_error", 1),
        (messages_ep, 200, "upstream_error", 1), (chat, 200, "upstream_error", 1),
        (chat, 200, "timeout", 1), (messages_ep, 499, "client_cancelled", 1),
    ]
    rows = await _rows(migrated_url, account_id, len(expected))
    assert [(r["endpoint"], r["status"], r["outcome"], r["attempts"]) for r in rows] \
        == expected
    assert len(flaky.requests) == 2
    # Cut-short streams bill what passed through, never zero.
    assert all(r["completion_tokens"] > 0 and r["cost_micros"] > 0
               for r in rows[-4:]), [dict(r) for r in rows[-4:]]

    stack.stop()  # logs are complete once both services have shut down
    for canary in (prompt, *replies.values()):
        await _assert_nowhere(canary, redis, migrated_url, stack)


async def _debits(migrated_url: str, account_id: str, expected: int) -> dict[str, int]:
    """The account's ledger debits by request id, once ``expected`` are in (2 s guard)."""
    conn = await asyncpg.connect(migrated_url)
    try:
        for _ in range(100):
            rows = await conn.fetch(
                "SELECT event_id, amount_micros FROM credit_ledger "
                "WHERE account_id = $1 AND kind = 'debit'", account_id)
            if len(rows) >= expected:
                break
            await asyncio.sleep(0.02)
        return {str(r["event_id"]): r["amount_micros"] for r in rows}
    finally:
        await conn.close()


async def test_each_providers_usage_row_bills_what_its_mock_reported(
    stack: Stack, migrated_url: str, mock_upstream: MockOpenAIUpstream,
    mock_anthropic: MockAnthropicUpstream, mock_gemini: MockGeminiUpstream,
) -> None:
    """Per provider, streamed and not: the row in Postgres (not just the event) has the
    mock's token counts, cache reads/writes and reasoning included, at catalog prices."""
    mock_anthropic.behaviour.cache_read_tokens = 30
    mock_anthropic.behaviour.cache_write_tokens = 11
    mock_gemini.behaviour.cache_read_tokens = 8
    mock_gemini.behaviour.reasoning_tokens = 6
    account_id, key = await _funded_key(stack, "billing")
    messages: Any = [{"role": "user", "content": "Tell me something."}]
    expected: list[dict[str, object]] = []
    oai, claude = _clients(stack, key)
    async with oai, claude:
        for stream in (False, True):
            if stream:
                await _openai_stream(oai, [], "demo-mini", messages,
                                     stream_options={"include_usage": True})
            else:
                await oai.chat.completions.create(model="demo-mini", messages=messages)
            sent = mock_upstream.requests[-1].body
            expected.append(_openai_row(expected_usage(sent, mock_upstream.behaviour), stream))
        for stream in (False, True):  # Claude through its own API, then through OpenAI's
            if stream:
                await _anthropic_stream(claude, [], "claude-demo", messages)
            else:
                await claude.messages.create(model="claude-demo", max_tokens=100,
                                             messages=messages)
            expected.append(_claude_row(mock_anthropic.reported_usage[-1], stream))
            if stream:
                await _openai_stream(oai, [], "claude-demo", messages)
            else:
                await oai.chat.completions.create(model="claude-demo", messages=messages)
            expected.append(_claude_row(mock_anthropic.reported_usage[-1], stream))
        for stream in (False, True):  # Gemini through OpenAI's API, then natively
            if stream:
                await _openai_stream(oai, [], "gemini-demo", messages)
            else:
                await oai.chat.completions.create(model="gemini-demo", messages=messages)
            expected.append(_gemini_row(mock_gemini.reported_usage[-1], stream))
            status, _ = await _gemini_native(stack, key, "Tell me something.", stream)
            assert status == 200
            expected.append(_gemini_row(mock_gemini.reported_usage[-1], stream))

    rows = await _rows(migrated_url, account_id, len(expected))
    assert [{c: r[c] for c in BILLED} for r in rows] == expected
    assert all(e["cost_micros"] > 0 for e in expected)  # type: ignore[operator]
    assert any(e["cached_tokens"] and e["cache_write_tokens"] for e in expected)
    assert any(e["reasoning_tokens"] for e in expected)
    # The ledger debits each request exactly its row's cost.
    debits = await _debits(migrated_url, account_id, len(rows))
    assert debits == {str(r["id"]): -r["cost_micros"] for r in rows}

