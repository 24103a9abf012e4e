"""The provider catalog: which models exist, where they are served and what they cost.

Loaded once at start-up from a TOML file::

    [providers.openai]
    kind = "openai"                       # wire format spoken by the upstream
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"        # the key itself never lives in the file

    [models."gpt-4o-mini"]
    provider = "openai"
    upstream_model = "gpt-4o-mini-2024-07-18"
    prompt_price = 0.15                   # USD per million tokens
    completion_price = 0.60

Everything the hot path needs per model (upstream URL, request headers, price) is
computed here, once. A model without a price is a start-up error, never a silent $0.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from shared.pricing import Price, PriceError, dollars_to_micros

SUPPORTED_KINDS = frozenset({"openai"})


class CatalogError(ValueError):
    """The catalog file is missing, unreadable or inconsistent; the message names the entry."""


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    kind: str
    base_url: str
    headers: Mapping[str, str]  # sent on every upstream request, provider key included

    def __repr__(self) -> str:  # never print the provider key
        return f"Provider(name={self.name!r}, kind={self.kind!r}, base_url={self.base_url!r})"


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    provider: Provider
    upstream_model: str
    price: Price
    chat_url: str


@dataclass(frozen=True, slots=True)
class Catalog:
    models: Mapping[str, Model]
    providers: Mapping[str, Provider]

    def get(self, name: str) -> Model | None:
        return self.models.get(name)


def _require(table: Mapping[str, Any], field: str, where: str, kind: type = str) -> Any:
    value = table.get(field)
    if value is None:
        raise CatalogError(f"{where}: missing required field '{field}'")
    if not isinstance(value, kind) or (kind is str and not value):
        raise CatalogError(f"{where}: field '{field}' must be a non-empty {kind.__name__}")
    return value


def _provider(name: str, table: Mapping[str, Any], env: Mapping[str, str]) -> Provider:
    where = f"providers.{name}"
    kind = table.get("kind", "openai")
    if kind not in SUPPORTED_KINDS:
        raise CatalogError(f"{where}: unsupported kind {kind!r} (supported: openai)")
    base_url = _require(table, "base_url", where).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise CatalogError(f"{where}: base_url must start with http:// or https://")
    headers = {"Content-Type": "application/json", "Accept": "*/*"}
    key_env = table.get("api_key_env")
    if key_env is not None:
        if not isinstance(key_env, str) or not key_env:
            raise CatalogError(f"{where}: api_key_env must name an environment variable")
        key = env.get(key_env)
        if not key:
            raise CatalogError(
                f"{where}: environment variable {key_env} (api_key_env) is not set or empty"
            )
        headers["Authorization"] = f"Bearer {key}"
    return Provider(name, kind, base_url, MappingProxyType(headers))


def _model(name: str, table: Mapping[str, Any], providers: Mapping[str, Provider]) -> Model:
    where = f'models."{name}"'
    provider_name = _require(table, "provider", where)
    provider = providers.get(provider_name)
    if provider is None:
        raise CatalogError(f"{where}: unknown provider {provider_name!r}")
    prices = {}
    for field in ("prompt_price", "completion_price"):
        if field not in table:
            raise CatalogError(f"{where}: missing {field} (USD per million tokens)")
        try:
            prices[field] = dollars_to_micros(table[field])
        except PriceError as e:
            raise CatalogError(f"{where}: {field}: {e}") from e
    return Model(
        name=name,
        provider=provider,
        upstream_model=table.get("upstream_model", name),
        price=Price(prompt=prices["prompt_price"], completion=prices["completion_price"]),
        chat_url=f"{provider.base_url}/chat/completions",
    )


def parse(doc: Mapping[str, Any], env: Mapping[str, str]) -> Catalog:
    provider_tables = doc.get("providers")
    model_tables = doc.get("models")
    if not isinstance(provider_tables, dict) or not provider_tables:
        raise CatalogError("the catalog defines no [providers.*] table")
    if not isinstance(model_tables, dict) or not model_tables:
        raise CatalogError("the catalog defines no [models.*] table")
    providers = {n: _provider(n, t, env) for n, t in provider_tables.items()}
    models = {n: _model(n, t, providers) for n, t in model_tables.items()}
    return Catalog(MappingProxyType(models), MappingProxyType(providers))


def load(path: Path, env: Mapping[str, str]) -> Catalog:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise CatalogError(f"cannot read catalog {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"catalog {path} is not valid TOML: {e}") from e
    return parse(doc, env)
