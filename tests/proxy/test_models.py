"""The model list: OpenAI's fields for its SDK, and OpenRouter's model object (name,
architecture, per-token prices, top provider, parameters) from the catalog's optional
fields, on ``/v1/models`` and ``/api/v1/models``; a model without them still loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.catalog import CatalogError, load
from tests.proxy.conftest import Gateway, GatewayFactory

DESCRIBED = """
[models."described"]
provider = "mock"
upstream_model = "described-2025"
prompt_price = 0.15
completion_price = 0.60
cache_read_price = 0.075
reasoning_price = 2.5
name = "Mock: Described"
canonical_slug = "mock/described-2025-01-01"
created = 1735689600
description = "A model <b>described</b> in full."
context_length = 128000
hugging_face_id = "mock/described"
supported_parameters = ["max_tokens", "temperature", "tools"]
default_parameters = { temperature = 0.7, top_p = 1.0 }
per_request_limits = { prompt_tokens = 100000 }

[models."described".architecture]
input_modalities = ["text", "image"]
output_modalities = ["text"]
tokenizer = "GPT"
instruct_type = "chatml"

[models."described".top_provider]
max_completion_tokens = 16384
is_moderated = true
"""


@pytest.fixture
async def described(start_gateway: GatewayFactory) -> Gateway:
    gw: Gateway = await start_gateway(catalog_extra=DESCRIBED)
    return gw


async def _raw(gateway: Gateway, path: str) -> dict[str, Any]:
    root = gateway.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as s, s.get(root + path) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        body: dict[str, Any] = await resp.json()
    return body


async def test_the_openai_sdk_lists_models_with_openrouters_fields(
    described: Gateway, api_key: str
) -> None:
    async with described.client(api_key) as client:
        page = await client.models.list()
    model = next(m for m in page.data if m.id == "described")
    assert (model.object, model.created, model.owned_by) == ("model", 1735689600, "mock")
    extra = model.model_extra or {}  # OpenRouter's fields, kept by the SDK
    assert extra["name"] == "Mock: Described"
    assert extra["pricing"]["prompt"] == "0.00000015"
    assert extra["architecture"]["modality"] == "text+image->text"


async def test_a_described_model_has_openrouters_model_object(described: Gateway) -> None:
    body = await _raw(described, "/v1/models")
    assert body["object"] == "list"
    model = next(m for m in body["data"] if m["id"] == "described")
    assert model == {
        "id": "described", "object": "model", "created": 1735689600, "owned_by": "mock",
        "name": "Mock: Described", "canonical_slug": "mock/described-2025-01-01",
        "hugging_face_id": "mock/described",
        "description": "A model <b>described</b> in full.", "context_length": 128000,
        "architecture": {"modality": "text+image->text",
                         "input_modalities": ["text", "image"],
                         "output_modalities": ["text"], "tokenizer": "GPT",
                         "instruct_type": "chatml"},
        # USD per token, as decimal strings; only the cache and reasoning prices named.
        "pricing": {"prompt": "0.00000015", "completion": "0.0000006", "request": "0",
                    "image": "0", "input_cache_read": "0.000000075",
                    "internal_reasoning": "0.0000025"},
        "top_provider": {"context_length": 128000, "max_completion_tokens": 16384,
                         "is_moderated": True},
        "per_request_limits": {"prompt_tokens": 100000},
        "supported_parameters": ["max_tokens", "temperature", "tools"],
        "default_parameters": {"temperature": 0.7, "top_p": 1.0},
    }
    # OpenRouter's clients list models under /api/v1: the same list, byte for byte.
    assert await _raw(described, "/api/v1/models") == body


async def test_a_model_without_the_fields_has_defaults_and_nulls(described: Gateway) -> None:
    body = await _raw(described, "/api/v1/models")
    model = next(m for m in body["data"] if m["id"] == "claude-demo")
    assert model["name"] == model["canonical_slug"] == "claude-demo"
    assert model["created"] == 0 and model["description"] == ""
    assert model["context_length"] is None and model["hugging_face_id"] is None
    assert model["architecture"] == {"modality": "text->text", "input_modalities": ["text"],
                                     "output_modalities": ["text"], "tokenizer": None,
                                     "instruct_type": None}
    assert model["pricing"] == {"prompt": "0.0000008", "completion": "0.000004",
                                "request": "0", "image": "0",
                                "input_cache_read": "0.00000008",
                                "input_cache_write": "0.000001"}
    assert model["top_provider"] == {"context_length": None, "max_completion_tokens": None,
                                     "is_moderated": False}
    assert model["per_request_limits"] is None and model["default_parameters"] is None
    assert model["supported_parameters"] == []


CATALOG = """
[providers.demo]
base_url = "http://127.0.0.1:9/v1"

[models."m"]
provider = "demo"
prompt_price = 1
completion_price = 2
"""


@pytest.mark.parametrize(("field", "message"), [
    ('context_length = "big"', "context_length"),
    ("context_length = 0", "context_length"),
    ("created = true", "created"),
    ("supported_parameters = [1]", "supported_parameters"),
    ('architecture = { input_modalities = "text" }', "input_modalities"),
    ('top_provider = { is_moderated = "yes" }', "is_moderated"),
    ('default_parameters = "warm"', "default_parameters"),
])
def test_a_wrong_model_field_is_a_startup_error_naming_it(
    tmp_path: Path, field: str, message: str
) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(CATALOG + field + "\n")
    with pytest.raises(CatalogError, match=f'models."m".*{message}'):
        load(path, {})
