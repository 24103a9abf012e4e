"""Deeply nested JSON through the real proxy, on every endpoint and every route.

orjson parses 1,024 levels but serialises only 254, so a body the proxy accepted could
fail when it was re-serialised for the upstream (pass-through with the model rewritten,
or a translation to another wire) and the client got a 500 with a traceback in the
log. Whatever the depth and wherever the nesting sits, the answer is a 2xx or a 400 in
the endpoint's own error format, never a 5xx, and nothing is logged as a bug.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson
import pytest

from tests.proxy.conftest import Gateway

DEPTHS = (100, 253, 254, 255, 256, 512, 1024, 1025)
ORJSON_MAX_DEPTH = 254  # the deepest document orjson serialises
PARSE_MAX_DEPTH = 1024  # the deepest document orjson parses
HOLE = '"@DEEP@"'  # where a template takes its nested value
USER = '"messages": [{"role": "user", "content": "Hi"}]'

# endpoint → (path template, auth header, error-format check, model of the same format)
ENDPOINTS: dict[str, tuple[str, str, str]] = {
    "openai": ("/v1/chat/completions", "Authorization", "demo-mini"),
    "anthropic": ("/v1/messages", "x-api-key", "claude-demo"),
    "gemini": ("/v1beta/models/{model}:generateContent", "x-goog-api-key", "gemini-demo"),
}
MODELS = ("demo-mini", "claude-demo", "gemini-demo")

# Per endpoint: bodies with the nested value in a field nobody translates (it passes
# through to a same-format upstream, and is dropped by a translation) and in fields that
# are translated (a tool's schema, a tool call's arguments or input).
TEMPLATES: dict[str, dict[str, str]] = {
    "openai": {
        "extra": '{"model": "@MODEL@", ' + USER + ', "metadata": ' + HOLE + '}',
        "tool schema": '{"model": "@MODEL@", ' + USER + ', "tools": [{"type": "function",'
                       ' "function": {"name": "f", "parameters": ' + HOLE + '}}]}',
    },
    "anthropic": {
        "extra": '{"model": "@MODEL@", "max_tokens": 5, ' + USER + ', "metadata": '
                 + HOLE + '}',
        "tool schema": '{"model": "@MODEL@", "max_tokens": 5, ' + USER + ', "tools": '
                       '[{"name": "f", "input_schema": ' + HOLE + '}]}',
        "tool input": '{"model": "@MODEL@", "max_tokens": 5, "messages": ['
                      '{"role": "user", "content": "Hi"}, {"role": "assistant", "content":'
                      ' [{"type": "tool_use", "id": "t1", "name": "f", "input": ' + HOLE
                      + '}]}, {"role": "user", "content": [{"type": "tool_result",'
                      ' "tool_use_id": "t1", "content": "ok"}]}]}',
    },
    "gemini": {
        "extra": '{"contents": [{"role": "user", "parts": [{"text": "Hi"}]}],'
                 ' "labels": ' + HOLE + '}',
        "tool schema": '{"contents": [{"role": "user", "parts": [{"text": "Hi"}]}],'
                       ' "tools": [{"functionDeclarations": [{"name": "f", "parameters": '
                       + HOLE + '}]}]}',
        "tool args": '{"contents": [{"role": "user", "parts": [{"text": "Hi"}]},'
                     ' {"role": "model", "parts": [{"functionCall": {"name": "f", "args": '
                     + HOLE + '}}]}, {"role": "user", "parts": [{"functionResponse":'
                     ' {"name": "f", "response": {"ok": true}}}]}]}',
    },
}


def _hole_depth(doc: Any, depth: int = 1) -> int | None:
    """How deep the hole sits: the top-level object's members are at depth 2."""
    items = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else ()
    for v in items:
        if v == HOLE.strip('"'):
            return depth + 1
        found = _hole_depth(v, depth + 1)
        if found is not None:
            return found
    return None


def deep_body(template: str, model: str, depth: int) -> bytes:
    """The template with its hole filled so that the whole body nests ``depth`` levels."""
    text = template.replace("@MODEL@", model)
    at = _hole_depth(orjson.loads(text))
    assert at is not None
    levels = depth - at + 1  # the nested value's own depth: objects {"d": {"d": ... {}}}
    nested = '{"d": ' * (levels - 1) + "{}" + "}" * (levels - 1)
    return text.replace(HOLE, nested).encode()


def assert_error_format(endpoint: str, doc: Any) -> None:
    if endpoint == "openai":
        assert doc["error"]["type"] == "invalid_request_error"
        assert isinstance(doc["error"]["message"], str)
    elif endpoint == "anthropic":
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    else:
        assert doc["error"]["code"] == 400 and doc["error"]["status"] == "INVALID_ARGUMENT"


async def _post(session: aiohttp.ClientSession, gateway: Gateway, endpoint: str, model: str,
                body: bytes, key: str) -> tuple[int, Any]:
    path, header, _ = ENDPOINTS[endpoint]
    value = f"Bearer {key}" if header == "Authorization" else key
    url = gateway.base_url.removesuffix("/v1") + path.format(model=model)
    async with session.post(url, data=body, headers={header: value,
                                                     "Content-Type": "application/json"}) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_deep_json_is_never_a_500_on_any_route(
    gateway: Gateway, api_key: str, endpoint: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    outcomes: dict[tuple[str, str, int], int] = {}
    async with aiohttp.ClientSession() as session:
        for placement, template in TEMPLATES[endpoint].items():
            for model in MODELS:
                for depth in DEPTHS:
                    body = deep_body(template, model, depth)
                    status, doc = await _post(session, gateway, endpoint, model, body, api_key)
                    outcomes[(placement, model, depth)] = status
                    assert status in (200, 400), (placement, model, depth, status, doc)
                    if status == 400:
                        assert_error_format(endpoint, doc)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    same_format = ENDPOINTS[endpoint][2]
    for (placement, model, depth), status in outcomes.items():
        if depth > PARSE_MAX_DEPTH:
            assert status == 400, (placement, model, depth)
        elif depth == 100:  # ordinary nesting is served on every route
            assert status == 200, (placement, model, depth)
        elif placement == "extra" and model == same_format:
            # Passed through with the model rewritten: the body goes upstream whole.
            assert status == (200 if depth <= ORJSON_MAX_DEPTH else 400), (model, depth)
        elif placement == "extra":
            assert status == 200, (model, depth)  # a translation drops the unknown field
    events = await gateway.events(len(outcomes))
    assert len(events) == len(outcomes) and all(e.status < 500 for e in events)


@pytest.mark.parametrize("operation", ["/v1/embeddings", "/v1/completions"])
async def test_deep_json_on_openai_operations_is_a_400_not_a_500(
    gateway: Gateway, api_key: str, operation: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    field = "input" if operation == "/v1/embeddings" else "prompt"
    url = gateway.base_url.removesuffix("/v1") + operation
    statuses = {}
    async with aiohttp.ClientSession() as session:
        for depth in DEPTHS:
            # A nested array in the input: the top-level object is level 1.
            body = ('{"model": "demo-mini", "max_tokens": 3, "' + field + '": '
                    + "[" * (depth - 1) + "]" * (depth - 1) + "}").encode()
            async with session.post(url, data=body,
                                    headers={"Authorization": f"Bearer {api_key}"}) as r:
                statuses[depth] = r.status
                doc = await r.json(content_type=None)
            assert r.status in (200, 400), (depth, r.status, doc)
            if r.status == 400:
                assert_error_format("openai", doc)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert statuses[1025] == 400 and statuses[512] == 400


# endpoint → (stream path, what the body says to stream)
STREAMS = {"openai": ("/v1/chat/completions", '"stream": true, '),
           "anthropic": ("/v1/messages", '"stream": true, '),
           "gemini": ("/v1beta/models/{model}:streamGenerateContent?alt=sse", "")}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_deep_json_in_a_stream_request_is_a_400_before_the_stream_starts(
    gateway: Gateway, api_key: str, endpoint: str,
) -> None:
    path, flag = STREAMS[endpoint]
    _, header, same_format = ENDPOINTS[endpoint]
    value = f"Bearer {api_key}" if header == "Authorization" else api_key
    template = TEMPLATES[endpoint]["extra"].replace("{", "{" + flag, 1)
    root = gateway.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        for model in MODELS:
            for depth in (200, 300):
                refused = depth > ORJSON_MAX_DEPTH and model == same_format
                async with session.post(root + path.format(model=model),
                                        data=deep_body(template, model, depth),
                                        headers={header: value}) as r:
                    raw = await r.read()
                    kind = r.headers["Content-Type"]
                assert r.status == (400 if refused else 200), (model, depth, raw[:300])
                if refused:  # an error document, not a stream that broke off
                    assert kind.startswith("application/json")
                    doc = orjson.loads(raw)
                    assert_error_format(endpoint, doc)
                    assert "nested" in doc["error"]["message"]
                else:
                    assert kind.startswith("text/event-stream") and raw, (model, depth)


@pytest.mark.parametrize("model", ["claude-demo", "gemini-demo"])
async def test_tool_call_arguments_that_are_not_json_are_a_400_when_translated(
    gateway: Gateway, api_key: str, model: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # Anthropic and Gemini carry a tool call's arguments as an object, so translating
    # an OpenAI conversation parses the client's argument text: bad text is the client's.
    caplog.set_level(logging.ERROR)
    body = {"model": model, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}
    async with aiohttp.ClientSession() as session:
        status, doc = await _post(session, gateway, "openai", model, orjson.dumps(body),
                                  api_key)
    assert status == 400 and "arguments" in doc["error"]["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
