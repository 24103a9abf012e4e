"""The provider catalog: which models exist, where they are served and what they cost.

Loaded once at start-up from a TOML file::

    [providers.openai]
    kind = "openai"                       # wire format spoken by the upstream
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"        # the key itself never lives in the file

    [providers.anthropic]
    kind = "anthropic"                    # openai | anthropic | gemini
    base_url = "https://api.anthropic.com/v1"
    api_key_env = "ANTHROPIC_API_KEY"

    [models."gpt-4o-mini"]
    provider = "openai"
    upstream_model = "gpt-4o-mini-2024-07-18"
    prompt_price = 0.15                   # USD per million tokens
    completion_price = 0.60
    cache_read_price = 0.075              # optional: default prompt_price
    cache_write_price = 0.15              # optional: default prompt_price
    reasoning_price = 0.60                # optional: default completion_price

    [models."claude-sonnet"]              # several deployments, chosen by weight
    prompt_price = 3
    completion_price = 15
    deployments = [
      { provider = "anthropic", upstream_model = "claude-sonnet-4-5", weight = 3 },
      { provider = "bedrock", upstream_model = "claude-sonnet-4-5", prompt_price = 3.3 },
    ]

Everything the hot path needs per deployment (base URL, request headers, price) is
computed here, once. A model without a price is a start-up error, never a silent $0.
A deployment inherits the model's prices and may override any of them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from proxy.providers.base import Wire
from proxy.providers.registry import WIRES
from shared.pricing import Price, PriceError, dollars_to_micros

SUPPORTED_KINDS = frozenset(WIRES)
_PRICE_FIELDS = ("prompt_price", "completion_price", "cache_read_price", "cache_write_price",
                 "reasoning_price")


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
class Deployment:
    """One place a model is served: provider, its model id, price and routing weight."""

    key: str  # "<model>#<n>": names this deployment in routing state
    provider: Provider
    upstream_model: str
    price: Price
    weight: int

    @property
    def base_url(self) -> str:
        return self.provider.base_url

    @property
    def headers(self) -> Mapping[str, str]:
        return self.provider.headers

    @property
    def wire(self) -> Wire:
        return WIRES[self.provider.kind]


@dataclass(frozen=True, slots=True)
class Model:
    """A catalog model; ``provider``/``upstream_model``/``price`` are its first deployment's."""

    name: str
    provider: Provider
    upstream_model: str
    price: Price
    chat_url: str
    deployments: tuple[Deployment, ...] = ()


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
        raise CatalogError(
            f"{where}: unsupported kind {kind!r} (supported: {', '.join(sorted(WIRES))})"
        )
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
        headers.update(WIRES[kind].auth_headers(key))
    elif kind == "anthropic":
        headers["anthropic-version"] = WIRES[kind].auth_headers("")["anthropic-version"]
    return Provider(name, kind, base_url, MappingProxyType(headers))


def _named_prices(table: Mapping[str, Any], where: str) -> dict[str, int]:
    prices = {}
    for field in _PRICE_FIELDS:
        if field in table:
            try:
                prices[field] = dollars_to_micros(table[field])
            except PriceError as e:
                raise CatalogError(f"{where}: {field}: {e}") from e
    return prices


def _prices(table: Mapping[str, Any], where: str,
            inherited: Mapping[str, int]) -> dict[str, int]:
    prices = {**inherited, **_named_prices(table, where)}
    for field in _PRICE_FIELDS[:2]:
        if field not in prices:
            raise CatalogError(f"{where}: missing {field} (USD per million tokens)")
    return prices


def _price(prices: Mapping[str, int]) -> Price:
    return Price(prompt=prices["prompt_price"], completion=prices["completion_price"],
                 cache_read=prices.get("cache_read_price"),
                 cache_write=prices.get("cache_write_price"),
                 reasoning=prices.get("reasoning_price"))


def _deployment(key: str, table: Mapping[str, Any], where: str, default_model: str,
                providers: Mapping[str, Provider], inherited: Mapping[str, int]) -> Deployment:
    provider_name = _require(table, "provider", where)
    provider = providers.get(provider_name)
    if provider is None:
        raise CatalogError(f"{where}: unknown provider {provider_name!r}")
    weight = table.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise CatalogError(f"{where}: weight must be a positive integer")
    upstream_model = table.get("upstream_model", default_model)
    if not isinstance(upstream_model, str) or not upstream_model:
        raise CatalogError(f"{where}: upstream_model must be a non-empty string")
    return Deployment(key, provider, upstream_model,
                      _price(_prices(table, where, inherited)), weight)


def _model(name: str, table: Mapping[str, Any], providers: Mapping[str, Provider]) -> Model:
    where = f'models."{name}"'
    tables = table.get("deployments")
    deployments: tuple[Deployment, ...]
    if tables is None:
        deployments = (_deployment(f"{name}#0", table, where, name, providers, {}),)
    else:
        if not isinstance(tables, list) or not tables or \
                not all(isinstance(t, dict) for t in tables):
            raise CatalogError(f"{where}: deployments must be a non-empty array of tables")
        inherited = _named_prices(table, where)
        deployments = tuple(
            _deployment(f"{name}#{i}", t, f"{where}.deployments[{i}]",
                        str(table.get("upstream_model", name)), providers, inherited)
            for i, t in enumerate(tables)
        )
    first = deployments[0]
    return Model(
        name=name,
        provider=first.provider,
        upstream_model=first.upstream_model,
        price=first.price,
        chat_url=f"{first.provider.base_url}/chat/completions",
        deployments=deployments,
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
