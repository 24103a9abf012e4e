"""A key's own credit limit through a running proxy: the 402 a client sees (OpenAI's
error JSON, its SDK's exception), and a limit the control plane raises reaching the
proxy over pub/sub without resetting what the key spent."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from shared.redis_names import RedisNames
from tests.proxy.conftest import Gateway, publish_key

BODY = b'{"model":"demo-mini","max_tokens":20,"messages":[{"role":"user","content":"Hi"}]}'
# What admission reserves for BODY: estimated prompt (bytes / 4) + max_tokens, priced.
RESERVATION = -(-((len(BODY) // 4) * 150_000 + 20 * 600_000) // 1_000_000)


async def _post(gateway: Gateway, key: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.post(
        gateway.base_url + "/chat/completions", data=BODY,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    ) as resp:
        body: dict[str, object] = await resp.json()
        return resp.status, body


async def _settled(redis: aioredis.Redis, spend: str) -> dict[str, int]:
    for _ in range(300):  # settlement runs just after the response (a hang guard)
        raw = await redis.hgetall(spend)
        if raw and int(raw[b"held"]) == 0:
            return {k.decode(): int(v) for k, v in raw.items()}
        await asyncio.sleep(0.01)
    raise AssertionError("never settled")


async def test_a_key_over_its_limit_gets_402_and_a_raised_limit_keeps_its_spend(
    gateway: Gateway, redis: aioredis.Redis, redis_names: RedisNames,
) -> None:
    account = str(uuid.uuid4())
    key, record = await publish_key(redis, redis_names, account,
                                    credit_limit_micros=RESERVATION, limit_reset="monthly")
    status, _ = await _post(gateway, key)
    assert status == 200
    spend = await _settled(redis, redis_names.key_spend(account, record.key_id))
    spent = spend["spent_month"]
    assert 0 < spent < RESERVATION  # the real cost, not the reservation
    status, body = await _post(gateway, key)  # limit - spent < one reservation
    assert status == 402
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "key_limit_exceeded"
    assert error["type"] == "insufficient_quota" and "credit limit" in error["message"]
    async with gateway.client(key) as client:  # as the SDK reports it
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(
                model="demo-mini", max_tokens=20,
                messages=[{"role": "user", "content": "Hi"}])
    assert exc.value.status_code == 402
    # The control plane raises the limit to exactly spent + one reservation.
    raised = replace(record, credit_limit_micros=spent + RESERVATION)
    await redis.set(redis_names.key_record(record.key_id), raised.encode())
    await redis.publish(redis_names.key_changes, record.key_id)
    for _ in range(100):  # the change message evicts the cached record (a hang guard)
        status, _ = await _post(gateway, key)
        if status != 402:
            break
        await asyncio.sleep(0.02)
    assert status == 200  # what was spent still counts: one more fits, not two
    spend = await _settled(redis, redis_names.key_spend(account, record.key_id))
    assert (await _post(gateway, key))[0] == 402
    assert spend["spent_month"] > spent
    events = await gateway.events(5)
    refused = [e for e in events if e.status == 402]
    assert len(refused) >= 3
    assert {(e.outcome, e.error_code) for e in refused} == {
        ("insufficient_credit", "key_limit_exceeded")}
