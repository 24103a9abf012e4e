"""Refusals after authentication are not free, and what a client names cannot poison
an event (issue 10, finding 5).

A key limited to a few requests a minute cannot get past its limit by sending requests
the proxy refuses before admission (unknown model, bad JSON, missing fields, bodies
over the limit); once over it, those get 429 with ``Retry-After`` like any other. A
model name with NUL or control characters, or eight million characters long, is
recorded bounded and cleaned, so its event still reaches Postgres.
"""

from __future__ import annotations

import asyncio
import io

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from multidict import CIMultiDict

from shared.events import TEXT_MAX
from shared.redis_names import RedisNames
from tests.proxy.conftest import Gateway, publish_key

MESSAGES = [{"role": "user", "content": "Say hello."}]


async def _post(gateway: Gateway, key: str, body: bytes,
                path: str = "/chat/completions") -> tuple[int, CIMultiDict[str]]:
    async with aiohttp.ClientSession() as s, s.post(
        gateway.base_url + path, data=io.BytesIO(body),  # large bodies too
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    ) as resp:
        await resp.read()
        return resp.status, resp.headers.copy()  # names case-insensitive


def _chat(model: str) -> bytes:
    return orjson.dumps({"model": model, "messages": MESSAGES})


async def test_two_404s_use_up_an_rpm_2_key_and_the_next_request_is_429(
    gateway: Gateway, redis: aioredis.Redis, redis_names: RedisNames,
) -> None:
    key, _ = await publish_key(redis, redis_names, account_id="acct-rpm2", limits={"rpm": 2})
    for _ in range(2):
        status, headers = await _post(gateway, key, _chat("no-such-model"))
        assert status == 404
    status, headers = await _post(gateway, key, _chat("demo-mini"))
    assert status == 429
    assert 1 <= int(headers["Retry-After"]) <= 60
    events = await gateway.events(3)
    assert [e.status for e in events] == [404, 404, 429]
    assert events[2].outcome == "rate_limited"


@pytest.mark.parametrize("body", [
    b"{not json",
    orjson.dumps({"model": "demo-mini"}),  # no messages
    orjson.dumps({"messages": MESSAGES}),  # no model
    orjson.dumps({"model": "demo-mini", "messages": MESSAGES, "max_tokens": "lots"}),
])
async def test_bad_requests_count_and_over_the_limit_they_are_429(
    gateway: Gateway, redis: aioredis.Redis, redis_names: RedisNames, body: bytes,
) -> None:
    key, _ = await publish_key(redis, redis_names, account_id="acct-bad", limits={"rpm": 3})
    assert (await _post(gateway, key, _chat("demo-mini")))[0] == 200
    first, headers = await _post(gateway, key, body)
    assert first == 400
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert (await _post(gateway, key, body))[0] == 400
    # The window now holds three: the refused request is refused for its rate first.
    status, headers = await _post(gateway, key, body)
    assert status == 429 and "Retry-After" in headers
    assert (await _post(gateway, key, _chat("demo-mini")))[0] == 429


async def test_a_body_over_the_limit_counts_too(
    start_gateway: object, redis: aioredis.Redis, redis_names: RedisNames,
) -> None:
    gateway: Gateway = await start_gateway(QNP_MAX_BODY_BYTES="2048")  # type: ignore[operator]
    key, _ = await publish_key(redis, redis_names, account_id="acct-413", limits={"rpm": 1})
    big = orjson.dumps({"model": "demo-mini", "messages": MESSAGES, "pad": "x" * 4096})
    assert (await _post(gateway, key, big))[0] == 413
    assert (await _post(gateway, key, _chat("demo-mini")))[0] == 429


async def test_admitted_requests_still_take_one_place_each(
    gateway: Gateway, redis: aioredis.Redis, redis_names: RedisNames,
) -> None:
    """Counting refusals does not count an admitted request twice."""
    key, _ = await publish_key(redis, redis_names, account_id="acct-ok", limits={"rpm": 3})
    remaining = [(await _post(gateway, key, _chat("demo-mini")))[1]
                 ["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]


@pytest.mark.parametrize(("model", "recorded"), [
    ("demo\x00mini\x07\x1b[31m", "demomini[31m"),
    ("m" * 8_000_000, "m" * TEXT_MAX),
    ("ok\u0085\ud7ff\u00e9", "ok\ud7ff\u00e9"),  # C1 control gone, other letters kept
])
async def test_client_chosen_model_names_are_recorded_bounded_and_clean(
    gateway: Gateway, api_key: str, model: str, recorded: str,
) -> None:
    status, headers = await _post(gateway, api_key, _chat(model))
    assert status == 404
    [event] = await gateway.events(1)
    assert event.id == headers["x-request-id"]
    assert event.requested_model == recorded
    raw = await gateway.redis.xrange(gateway.names.events)
    assert len(raw[0][1][b"e"]) < 4096  # the stream entry itself stays small


async def test_gemini_model_from_the_url_is_bounded(gateway: Gateway, api_key: str) -> None:
    body = orjson.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
    status, _ = await _post(gateway, api_key, body,
                            "beta/models/" + "g" * 1000 + ":generateContent")
    assert status == 404
    [event] = await gateway.events(1)
    assert event.requested_model == "g" * TEXT_MAX


async def test_an_admitted_request_still_costs_one_admission_call(
    gateway: Gateway, redis: aioredis.Redis, redis_names: RedisNames,
) -> None:
    """Counting refusals adds no Redis round trip to an admitted request: one EVALSHA
    to admit it and one, off its path, to settle it; a refusal adds only its count."""
    key, _ = await publish_key(redis, redis_names, account_id="acct-rt", limits={"rpm": 10})
    assert (await _post(gateway, key, _chat("demo-mini")))[0] == 200  # key now cached
    await gateway.events(1)

    async def evalshas() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    async def settled(before: int, expected: int) -> int:
        for _ in range(200):  # settlement runs off the request's path
            if await evalshas() - before >= expected:
                break
            await asyncio.sleep(0.01)
        return await evalshas() - before

    before = await evalshas()
    for _ in range(3):
        assert (await _post(gateway, key, _chat("demo-mini")))[0] == 200
    assert await settled(before, 6) == 6  # 3 admissions + 3 settlements
    before = await evalshas()
    assert (await _post(gateway, key, _chat("no-such-model")))[0] == 404
    assert await settled(before, 1) == 1  # the count, and nothing to settle
