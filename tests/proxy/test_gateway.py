"""The proxy, end to end on real sockets: official openai SDK → proxy → mock upstream.

Each test checks what a user of the gateway would notice: the answer, the status and
error JSON, the request id, and the one metadata event every request leaves behind.
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from devstack.upstream_openai import MockOpenAIUpstream
from shared.redis_names import RedisNames
from tests.proxy.conftest import Gateway, GatewayFactory, publish_key

MESSAGES = [{"role": "user", "content": "Say hello."}]


async def test_non_stream_completion_is_passed_through_and_recorded(
    gateway: Gateway, api_key: str, mock_upstream: MockOpenAIUpstream
) -> None:
    async with gateway.client(api_key) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="demo-mini", messages=MESSAGES  # type: ignore[arg-type]
        )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None
    request_id = raw.headers["x-request-id"]

    [event] = await gateway.events(1)
    assert event.id == request_id
    assert (event.status, event.outcome, event.usage_source) == (200, "ok", "upstream")
    assert event.prompt_tokens == completion.usage.prompt_tokens
    assert event.completion_tokens == completion.usage.completion_tokens
    expected_cost = -(-(completion.usage.prompt_tokens * 150_000
                        + completion.usage.completion_tokens * 600_000) // 1_000_000)
    assert event.cost_micros == expected_cost
    assert event.served_model == "demo-mini-2024" and event.provider == "mock"
    assert event.account_id == "acct-test" and event.first_byte_at_us is not None

    # The upstream got our provider key, never the client's, and our model id.
    [seen] = mock_upstream.requests
    assert seen.headers["Authorization"] == "Bearer sk-upstream-test"
    assert api_key not in str(dict(seen.headers))
    assert seen.body["model"] == "demo-mini-2024"


async def test_stream_without_usage_option_gets_no_usage_chunk_but_is_billed(
    gateway: Gateway, api_key: str, mock_upstream: MockOpenAIUpstream
) -> None:
    async with gateway.client(api_key) as client:
        stream = await client.chat.completions.create(
            model="demo-mini", messages=MESSAGES, stream=True  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == mock_upstream.behaviour.reply
    assert all(c.choices for c in chunks), "the usage-only chunk must not reach this client"
    assert mock_upstream.requests[0].body["stream_options"] == {"include_usage": True}

    [event] = await gateway.events(1)
    assert event.stream and event.usage_source == "upstream"
    assert event.completion_tokens > 0 and event.cost_micros > 0


async def test_stream_with_usage_option_gets_the_usage_chunk(
    gateway: Gateway, api_key: str
) -> None:
    async with gateway.client(api_key) as client:
        stream = await client.chat.completions.create(
            model="demo-mini", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    [event] = await gateway.events(1)
    assert (event.prompt_tokens, event.completion_tokens) == (
        usage.prompt_tokens, usage.completion_tokens)


async def _post(gateway: Gateway, body: bytes, key: str | None, **headers: str
                ) -> tuple[int, dict[str, object], str]:
    h = {"Content-Type": "application/json", **headers}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as s, s.post(
        f"{gateway.base_url}/chat/completions", data=body, headers=h
    ) as resp:
        return resp.status, await resp.json(), resp.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "status", "code", "outcome"),
    [
        (b"{not json", 400, "invalid_json", "bad_request"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, None, "bad_request"),
        (b'{"model": "demo-mini"}', 400, None, "bad_request"),
        (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
         404, "model_not_found", "not_found"),
    ],
)
async def test_bad_requests_get_openai_errors_and_one_event_each(
    gateway: Gateway, api_key: str, body: bytes, status: int, code: str | None, outcome: str
) -> None:
    got, doc, request_id = await _post(gateway, body, api_key)
    assert got == status
    error = doc["error"]
    assert isinstance(error, dict) and error["message"] and error["type"]
    assert error["code"] == code
    [event] = await gateway.events(1)
    assert (event.id, event.status, event.outcome) == (request_id, status, outcome)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic dXNlcjpwYXNz",
        "Bearer ",
        "Bearer qnp_short",
        "Bearer " + "x" * 5000,
        "Bearer qnp_ñññññññññññññ",
    ],
)
async def test_missing_or_malformed_keys_are_401_without_lookup(
    gateway: Gateway, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with aiohttp.ClientSession() as s, s.post(
        f"{gateway.base_url}/chat/completions", data=b"{}", headers=headers
    ) as resp:
        assert resp.status == 401
        doc = await resp.json()
    assert doc["error"]["code"] == "invalid_api_key"
    [event] = await gateway.events(1)
    assert event.outcome == "unauthorized" and event.key_id is None


async def test_wrong_checksum_and_unknown_keys_are_401(
    gateway: Gateway, api_key: str
) -> None:
    typo = api_key[:-1] + ("A" if api_key[-1] != "A" else "B")
    from shared import apikeys

    unknown, _ = apikeys.generate()  # well-formed, never published
    wrong_secret = api_key[:17] + unknown[17:]  # real key id, another key's secret+checksum
    for key in (typo, unknown, wrong_secret):
        async with gateway.client(key) as client:
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(
                    model="demo-mini", messages=MESSAGES  # type: ignore[arg-type]
                )
    events = await gateway.events(3)
    assert [e.status for e in events] == [401, 401, 401]


async def test_revoked_key_is_refused_within_a_second_on_a_running_proxy(
    gateway: Gateway, api_key: str, redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    async with gateway.client(api_key) as client:
        await client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
        # Revoke the way the control plane does: new record, then a change message.
        from shared.apikeys import KeyRecord, parse

        key_id = parse(api_key).key_id
        record = KeyRecord.decode(await redis.get(redis_names.key_record(key_id)))
        revoked = KeyRecord(record.key_id, record.account_id, "revoked", record.secret_hash, {})
        await redis.set(redis_names.key_record(key_id), revoked.encode())
        await redis.publish(redis_names.key_changes, key_id)
        loop = asyncio.get_running_loop()
        revoked_at = loop.time()
        while True:
            try:
                await client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
            except openai.AuthenticationError as e:
                assert "revoked" in str(e)
                break
            assert loop.time() - revoked_at < 1.0, "revoked key still served after 1 s"
            await asyncio.sleep(0.02)


async def test_cache_hit_does_not_touch_redis(
    gateway: Gateway, api_key: str, redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    async with gateway.client(api_key) as client:
        await client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
        # Remove the record: a cached key keeps working without asking Redis again.
        from shared.apikeys import parse

        await redis.delete(redis_names.key_record(parse(api_key).key_id))
        again = await client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert again.choices[0].message.content


async def test_concurrent_first_requests_share_one_bcrypt(
    gateway: Gateway, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bcrypt

    calls = 0
    real = bcrypt.checkpw

    def counting(secret: bytes, hashed: bytes) -> bool:
        nonlocal calls
        calls += 1
        return bool(real(secret, hashed))

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    async with gateway.client(api_key) as client:
        results = await asyncio.gather(*(
            client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
            for _ in range(20)
        ))
    assert len(results) == 20 and calls == 1


async def test_body_over_the_limit_is_413_without_reading_it_all(
    start_gateway: GatewayFactory, api_key: str
) -> None:
    gateway: Gateway = await start_gateway(QNP_MAX_BODY_BYTES="65536")
    host, port = gateway.base_url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    # Announce 100 MB, send 1 KB: a proxy that waited for the body would never answer.
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {api_key}\r\n".encode()
        + b"Content-Length: 100000000\r\n\r\n" + b"{" + b" " * 1024
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    await writer.wait_closed()
    assert status_line.startswith(b"HTTP/1.1 413")
    [event] = await gateway.events(1)
    assert event.status == 413 and event.outcome == "bad_request"


async def test_upstream_connection_refused_is_502(gateway: Gateway, api_key: str) -> None:
    async with gateway.client(api_key) as client:
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(model="unreachable", messages=MESSAGES)  # type: ignore[arg-type]
    assert exc.value.status_code == 502
    [event] = await gateway.events(1)
    assert event.outcome == "upstream_error" and event.provider == "dead"


async def test_no_first_byte_in_time_is_504(
    start_gateway: GatewayFactory, api_key: str, mock_upstream: MockOpenAIUpstream
) -> None:
    gateway: Gateway = await start_gateway(QNP_FIRST_BYTE_TIMEOUT="0.2")
    mock_upstream.behaviour.first_byte_delay = 3.0
    async with gateway.client(api_key) as client:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as exc:
                await client.chat.completions.create(
                    model="demo-mini", messages=MESSAGES, stream=stream  # type: ignore[arg-type]
                )
            assert exc.value.status_code == 504
    events = await gateway.events(2)
    assert [e.outcome for e in events] == ["timeout", "timeout"]


async def test_upstream_5xx_is_502_and_upstream_429_is_passed_on(
    gateway: Gateway, api_key: str, mock_upstream: MockOpenAIUpstream
) -> None:
    async with gateway.client(api_key) as client:
        mock_upstream.behaviour.error_status = 500
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
        assert exc.value.status_code == 502
        mock_upstream.behaviour.error_status = 429
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
    events = await gateway.events(2)
    assert [(e.status, e.outcome) for e in events] == [(502, "upstream_error"),
                                                        (429, "upstream_error")]


async def test_client_leaving_mid_stream_cancels_upstream_and_is_recorded(
    gateway: Gateway, api_key: str, mock_upstream: MockOpenAIUpstream
) -> None:
    mock_upstream.behaviour.chunks = 200
    mock_upstream.behaviour.chunk_delay = 0.02
    async with gateway.client(api_key) as client:
        stream = await client.chat.completions.create(
            model="demo-mini", messages=MESSAGES, stream=True  # type: ignore[arg-type]
        )
        got = 0
        async for _chunk in stream:
            got += 1
            if got == 5:
                break
        await stream.close()
    [event] = await gateway.events(1)
    assert event.outcome == "client_cancelled"
    # Tokens generated before the client left are still counted (estimated: no usage came).
    assert event.usage_source == "estimated" and event.completion_tokens >= 5


async def test_models_health_and_metrics(gateway: Gateway, api_key: str) -> None:
    async with gateway.client(api_key) as client:
        models = await client.models.list()
        await client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert {m.id for m in models.data} == {"demo-mini", "unreachable", "claude-demo",
                                           "gemini-demo"}
    root = gateway.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz"):
            async with s.get(root + path) as resp:
                assert resp.status == 200
        async with s.get(root + "/v1/nothing-here") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "unknown_url"
        # Metrics have a listener of their own; the public port does not show them.
        async with s.get(root + "/metrics") as resp:
            assert resp.status == 404
        metrics_root = f"http://127.0.0.1:{gateway.running.metrics_port}"
        async with s.get(metrics_root + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        async with s.get(metrics_root + "/healthz") as resp:
            assert resp.status == 200
        async with s.get(metrics_root + "/v1/models") as resp:
            assert resp.status == 404
    assert 'qnp_requests_total{model="demo-mini",status="200"} 1.0' in text
    assert "qnp_time_to_first_token_seconds_bucket" in text
    assert "qnp_events_emitted_total" in text


async def test_key_of_another_status_in_redis_is_refused(
    gateway: Gateway, redis: aioredis.Redis, redis_names: RedisNames
) -> None:
    key, _ = await publish_key(redis, redis_names, status="revoked")
    async with gateway.client(key) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="demo-mini", messages=MESSAGES)  # type: ignore[arg-type]
