"""The whole spine as a user meets it, every service a real process.

openai and anthropic SDKs (and Gemini's native paths) → proxy → mock upstreams in each
provider's wire format, with the metadata event travelling through the Redis stream
into Postgres by the control plane's ingest; keys issued and revoked through the admin
API. Canary strings planted in the prompts and in every upstream's replies, on every
provider and every error path (refusals, mid-stream errors, idle timeouts, fallbacks,
cancelled streams), must then appear nowhere we keep anything: no Redis key or stream
entry, no Postgres table, no log line of either service. The usage rows in Postgres
bill exactly what each mock reported, at the catalog's prices.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
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
from shared.redis_names import RedisNames
from tests.proxy.conftest import proxy_env, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

ADMIN_TOKEN = "admin-" + secrets.token_hex(8)
UPSTREAM_KEY = "sk-upstream-test"
IDLE_TIMEOUT = "0.5"  # QNP_READ_TIMEOUT: the stream idle timeout, shortened for tests
# A model whose first deployment (all but certainly tried first) answers 503.
FALLBACK_CATALOG = """
[providers.flaky]
base_url = "{flaky_url}"
api_key_env = "MOCK_UPSTREAM_KEY"

[models."ha-demo"]
prompt_price = 0.15
completion_price = 0.60
deployments = [{{ provider = "flaky", upstream_model = "x", weight = 1000000 }},
               {{ provider = "mock", upstream_model = "demo-mini-2024", weight = 1 }}]
"""


def _nothing() -> None:
    return None


@dataclass
class Stack:
    proxy_url: str
    admin_url: str
    logs: list[Path]
    names: RedisNames
    stop: Callable[[], None] = field(default=_nothing)  # SIGTERM both; logs are final after

    @property
    def root(self) -> str:
        return self.proxy_url.removesuffix("/v1")

    async def admin(self, method: str, path: str, json: object = None) -> dict[str, object]:
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as s, s.request(method, self.admin_url + path, json=json) as resp:
            assert resp.status < 300, await resp.text()
            doc = await resp.json()
            assert isinstance(doc, dict)
            return doc


@pytest.fixture
async def mock_anthropic() -> AsyncIterator[MockAnthropicUpstream]:
    up = MockAnthropicUpstream(behaviour=MockBehaviour(api_key=UPSTREAM_KEY))
    async with up:
        yield up


@pytest.fixture
async def mock_gemini() -> AsyncIterator[MockGeminiUpstream]:
    up = MockGeminiUpstream(behaviour=MockBehaviour(api_key=UPSTREAM_KEY))
    async with up:
        yield up


@pytest.fixture
async def flaky() -> AsyncIterator[MockOpenAIUpstream]:
    """An OpenAI-format upstream that answers 503: the first deployment of ha-demo."""
    behaviour = UpstreamBehaviour(api_key=UPSTREAM_KEY, error_status=503)
    async with MockOpenAIUpstream(behaviour=behaviour) as up:
        yield up


@pytest.fixture
async def stack(
    tmp_path: Path, migrated_url: str, redis_url: str, redis_names: RedisNames,
    mock_upstream: MockOpenAIUpstream, mock_anthropic: MockAnthropicUpstream,
    mock_gemini: MockGeminiUpstream, flaky: MockOpenAIUpstream,
) -> AsyncIterator[Stack]:
    proxy_port, admin_port = free_port(), free_port()
    catalog = write_catalog(tmp_path, mock_upstream.base_url, mock_anthropic.base_url,
                            mock_gemini.base_url,
                            FALLBACK_CATALOG.format(flaky_url=flaky.base_url))
    env = {
        **proxy_env(redis_url, redis_names, catalog, QNP_PROXY_PORT=str(proxy_port),
                    QNP_READ_TIMEOUT=IDLE_TIMEOUT),
        "DATABASE_URL": migrated_url,
        "QNP_ADMIN_TOKEN": ADMIN_TOKEN,
        "QNP_ADMIN_PORT": str(admin_port),
        "QNP_BCRYPT_ROUNDS": "4",
        "QNP_LOG_LEVEL": "DEBUG",  # the most any service would ever log
        "PATH": "/usr/bin:/bin",
    }
    subprocess.run([sys.executable, "-m", "control_plane", "migrate"], env=env, check=True,
                   capture_output=True)
    cp_log, px_log = tmp_path / "control_plane.log", tmp_path / "proxy.log"
    with ModuleProcess("control_plane", ["serve"], log_path=cp_log, env=env) as cp, \
            ModuleProcess("proxy", log_path=px_log, env=env) as px:
        await wait_for_http(f"http://127.0.0.1:{admin_port}/healthz", expect_status=200)
        await wait_for_http(f"http://127.0.0.1:{proxy_port}/readyz", expect_status=200)

        def stop() -> None:
            # Stop both (SIGTERM) before the logs are read: shutdown logging counts too.
            assert px.stop() == 0 and cp.stop() == 0

        yield Stack(f"http://127.0.0.1:{proxy_port}/v1", f"http://127.0.0.1:{admin_port}",
                    [cp_log, px_log], redis_names, stop)
        stop()


async def _rows(migrated_url: str, account_id: str, expected: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(migrated_url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0  # the spine's promise: a row within 2 s
        while True:
            rows = await conn.fetch(
                "SELECT * FROM usage_logs WHERE account_id = $1 ORDER BY received_at",
                account_id,
            )
            if len(rows) >= expected or loop.time() > deadline:
                return list(rows)
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def test_sdk_requests_land_in_postgres_priced_and_content_free(
    stack: Stack, migrated_url: str, redis: aioredis.Redis, mock_upstream: MockOpenAIUpstream,
) -> None:
    prompt_canary = "CANARY-PROMPT-" + secrets.token_hex(12)
    reply_canary = "CANARY-REPLY-" + secrets.token_hex(12)
    mock_upstream.behaviour.reply = f"Here it is: {reply_canary} and more words."
    account = await stack.admin("POST", "/admin/accounts", {"name": "e2e"})
    await stack.admin("POST", f"/admin/accounts/{account['id']}/credit",
                      {"amount_micros": 5_000_000, "reference": "e2e-topup"})
    issued = await stack.admin("POST", f"/admin/accounts/{account['id']}/keys", {"name": "k"})
    key = str(issued["key"])
    messages = [{"role": "user", "content": f"Repeat {prompt_canary} please."}]

    async with openai.AsyncOpenAI(base_url=stack.proxy_url, api_key=key,
                                  max_retries=0) as client:
        plain = await client.chat.completions.with_raw_response.create(
            model="demo-mini", messages=messages  # type: ignore[arg-type]
        )
        stream = await client.chat.completions.create(
            model="demo-mini", messages=messages, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        # An error path too: the canary rides in a request the upstream refuses.
        mock_upstream.behaviour.error_status = 400
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="demo-mini", messages=messages)  # type: ignore[arg-type]
    completion = plain.parse()
    assert reply_canary in (completion.choices[0].message.content or "")
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reply_canary in streamed_text
    stream_usage = chunks[-1].usage
    assert completion.usage is not None and stream_usage is not None

    rows = await _rows(migrated_url, str(account["id"]), 3)
    assert len(rows) == 3, "each request must be in Postgres within 2 s"
    by_id = {str(r["id"]): r for r in rows}
    first = by_id[plain.headers["x-request-id"]]
    assert (first["prompt_tokens"], first["completion_tokens"]) == (
        completion.usage.prompt_tokens, completion.usage.completion_tokens)
    expected_cost = -(-(completion.usage.prompt_tokens * 150_000
                        + completion.usage.completion_tokens * 600_000) // 1_000_000)
    assert first["cost_micros"] == expected_cost and first["cost_micros"] > 0
    assert first["latency_ms"] > 0 and first["key_id"] == issued["key_id"]
    streamed = next(r for r in rows if r["stream"])
    assert streamed["completion_tokens"] == stream_usage.completion_tokens
    assert sorted(r["status"] for r in rows) == [200, 200, 400]

    usage = await stack.admin("GET", f"/admin/accounts/{account['id']}/usage")
    assert len(usage["records"]) == 3  # type: ignore[arg-type]
    # Traffic has stopped: the live balance the proxies admit against and the ledger
    # in Postgres agree to the micro-dollar, and both say what the rows cost.
    spent = sum(r["cost_micros"] for r in rows)
    for _ in range(100):  # settlement runs just after each response (a hang guard)
        balance = await stack.admin("GET", f"/admin/accounts/{account['id']}/balance")
        if balance["reserved_micros"] == 0:
            break
        await asyncio.sleep(0.05)
    assert balance == {"ledger_micros": 5_000_000 - spent, "live_micros": 5_000_000 - spent,
                       "reserved_micros": 0}

    # Revocation through the admin API reaches the running proxy within a second.
    await stack.admin("POST", f"/admin/keys/{issued['key_id']}/revoke")
    loop = asyncio.get_running_loop()
    revoked_at = loop.time()
    async with openai.AsyncOpenAI(base_url=stack.proxy_url, api_key=key,
                                  max_retries=0) as client:
        mock_upstream.behaviour.error_status = None
        while True:
            try:
                await client.chat.completions.create(model="demo-mini", messages=messages)  # type: ignore[arg-type]
            except openai.AuthenticationError:
                break
            assert loop.time() - revoked_at < 1.0, "revoked key still served after 1 s"
            await asyncio.sleep(0.02)
    await _rows(migrated_url, str(account["id"]), 4)

    for canary in (prompt_canary, reply_canary):
        await _assert_nowhere(canary, redis, migrated_url, stack)


async def _assert_nowhere(canary: str, redis: aioredis.Redis, migrated_url: str,
                          stack: Stack) -> None:
    needle = canary.encode()
    # Redis: every key of every type in the database the services used.
    async for name in redis.scan_iter(count=1000):
        kind = (await redis.type(name)).decode()
        if kind == "string":
            dump = [await redis.get(name)]
        elif kind == "hash":
            dump = [*(await redis.hgetall(name)).items()]
        elif kind == "list":
            dump = await redis.lrange(name, 0, -1)
        elif kind == "set":
            dump = list(await redis.smembers(name))
        elif kind == "zset":
            dump = await redis.zrange(name, 0, -1)
        elif kind == "stream":
            dump = await redis.xrange(name)
        else:
            dump = [await redis.dump(name)]
        assert needle not in repr(dump).encode(), f"canary found in Redis key {name!r}"
    # Postgres: every row of every table, partitions included, as text.
    conn = await asyncpg.connect(migrated_url)
    try:
        tables = await conn.fetch(
            "SELECT format('%I.%I', schemaname, tablename) AS t FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
        assert tables
        for (table,) in tables:
            for (text,) in await conn.fetch(f"SELECT t::text FROM {table} t"):
                assert canary not in text, f"canary found in Postgres table {table}"
    finally:
        await conn.close()
    # Logs of both services (read after they stopped).
    for log in stack.logs:
        assert canary not in log.read_text(errors="replace"), f"canary found in {log.name}"


async def test_the_canary_scan_finds_what_is_planted(
    tmp_path: Path, migrated_url: str, redis: aioredis.Redis, redis_names: RedisNames,
) -> None:
    """The scan above is only worth something if it would catch a leak."""
    canary = "CANARY-PLANTED-" + secrets.token_hex(8)
    log = tmp_path / "service.log"
    log.write_text("nothing here\n")
    stack = Stack("", "", [log], redis_names)
    await redis.xadd(redis_names.events, {b"e": f'{{"leak": "{canary}"}}'.encode()})
    with pytest.raises(AssertionError, match="Redis key"):
        await _assert_nowhere(canary, redis, migrated_url, stack)
    await redis.delete(redis_names.events)
    log.write_text(f"oops {canary}\n")
    with pytest.raises(AssertionError, match="service.log"):
        await _assert_nowhere(canary, redis, migrated_url, stack)


async def test_a_top_up_is_spendable_on_the_proxy_within_a_second(stack: Stack) -> None:
    account = await stack.admin("POST", "/admin/accounts", {"name": "broke"})
    issued = await stack.admin("POST", f"/admin/accounts/{account['id']}/keys", {"name": "k"})
    messages = [{"role": "user", "content": "Hello"}]
    async with openai.AsyncOpenAI(base_url=stack.proxy_url, api_key=str(issued["key"]),
                                  max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(model="demo-mini", messages=messages)  # type: ignore[arg-type]
        assert exc.value.status_code == 402
        await stack.admin("POST", f"/admin/accounts/{account['id']}/credit",
                          {"amount_micros": 1_000_000})
        loop = asyncio.get_running_loop()
        credited = loop.time()
        while True:
            try:
                await client.chat.completions.create(model="demo-mini", messages=messages)  # type: ignore[arg-type]
                break
            except openai.APIStatusError as e:
                assert e.status_code == 402
                assert loop.time() - credited < 1.0, "top-up not spendable within 1 s"
                await asyncio.sleep(0.02)


# --- every provider and every error path of issue 3 -----------------------------------

# Catalog prices (tests/proxy/conftest.py) in micro-dollars per million tokens.
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
