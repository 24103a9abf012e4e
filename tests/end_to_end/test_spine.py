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
from pathlib import Path

import openai
import pytest
import redis.asyncio as aioredis

from devstack.upstream_openai import MockOpenAIUpstream
from shared.redis_names import RedisNames
from tests.end_to_end.conftest import Stack, _assert_nowhere, _rows


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
