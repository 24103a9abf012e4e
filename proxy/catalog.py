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

What ``GET /v1/models`` tells people about a model (OpenRouter's model object, beside
OpenAI's fields) comes from optional fields of the model's table, named as OpenRouter
names them; prices are the model's own (per token, as decimal strings)::

    [models."gpt-4o-mini"]
    name = "OpenAI: GPT-4o mini"          # display name; default: the model's id
    canonical_slug = "openai/gpt-4o-mini-2024-07-18"  # default: the model's id
    created = 1721260800                  # Unix seconds the model was added; default 0
    description = "A small, fast model."  # default ""
    context_length = 128000               # tokens; default null
    hugging_face_id = ""                  # default null
    supported_parameters = ["max_tokens", "temperature", "tools"]  # default []
    default_parameters = { temperature = 1.0 }  # default null
    per_request_limits = { prompt_tokens = 100000 }  # default null

    [models."gpt-4o-mini".architecture]   # default: text in, text out, the rest null
    input_modalities = ["text", "image"]  # modality is derived: "text+image->text"
    output_modalities = ["text"]
    tokenizer = "GPT"
    instruct_type = "chatml"

    [models."gpt-4o-mini".top_provider]
    max_completion_tokens = 16384         # default null
    is_moderated = true                   # default false
    context_length = 128000               # default: the model's context_length

A model without any of them still loads: its object carries the defaults above.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
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
class ModelInfo:
    """What the model list says about a model beyond its id and prices (all optional)."""

    name: str | None = None
    canonical_slug: str | None = None
    created: int = 0
    description: str = ""
    context_length: int | None = None
    hugging_face_id: str | None = None
    input_modalities: tuple[str, ...] = ("text",)
    output_modalities: tuple[str, ...] = ("text",)
    tokenizer: str | None = None
    instruct_type: str | None = None
    max_completion_tokens: int | None = None
    top_context_length: int | None = None
    is_moderated: bool = False
    supported_parameters: tuple[str, ...] = ()
    default_parameters: Mapping[str, Any] | None = None
    per_request_limits: Mapping[str, Any] | None = None


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
    info: ModelInfo = ModelInfo()  # immutable: one shared default is safe


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


def _optional(table: Mapping[str, Any], name: str, where: str, kind: type | tuple[type, ...],
              default: Any = None) -> Any:
    value = table.get(name, default)
    if value is not default and (isinstance(value, bool) and kind is int
                                 or not isinstance(value, kind)):
        raise CatalogError(f"{where}: {name} has the wrong type")
    return value


def _strings(table: Mapping[str, Any], name: str, where: str,
             default: tuple[str, ...]) -> tuple[str, ...]:
    value = table.get(name)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CatalogError(f"{where}: {name} must be an array of non-empty strings")
    return tuple(value)


def _table(table: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = table.get(name, {})
    if not isinstance(value, dict):
        raise CatalogError(f"{where}: {name} must be a table")
    return value


def _count(table: Mapping[str, Any], name: str, where: str) -> int | None:
    value = _optional(table, name, where, int)
    if value is not None and value < 1:
        raise CatalogError(f"{where}: {name} must be a positive integer")
    return value  # type: ignore[no-any-return]


def _info(table: Mapping[str, Any], where: str) -> ModelInfo:
    arch = _table(table, "architecture", where)
    top = _table(table, "top_provider", where)
    a_where, t_where = f"{where}.architecture", f"{where}.top_provider"
    context_length = _count(table, "context_length", where)
    default_parameters = _optional(table, "default_parameters", where, dict)
    per_request_limits = _optional(table, "per_request_limits", where, dict)
    created = _optional(table, "created", where, int, 0)
    if created < 0:
        raise CatalogError(f"{where}: created must be Unix seconds")
    return ModelInfo(
        name=_optional(table, "name", where, str),
        canonical_slug=_optional(table, "canonical_slug", where, str),
        created=created,
        description=_optional(table, "description", where, str, ""),
        context_length=context_length,
        hugging_face_id=_optional(table, "hugging_face_id", where, str),
        input_modalities=_strings(arch, "input_modalities", a_where, ("text",)),
        output_modalities=_strings(arch, "output_modalities", a_where, ("text",)),
        tokenizer=_optional(arch, "tokenizer", a_where, str),
        instruct_type=_optional(arch, "instruct_type", a_where, str),
        max_completion_tokens=_count(top, "max_completion_tokens", t_where),
        top_context_length=_count(top, "context_length", t_where) or context_length,
        is_moderated=_optional(top, "is_moderated", t_where, bool, False),
        supported_parameters=_strings(table, "supported_parameters", where, ()),
        default_parameters=None if default_parameters is None
        else MappingProxyType(dict(default_parameters)),
        per_request_limits=None if per_request_limits is None
        else MappingProxyType(dict(per_request_limits)),
    )


def _per_token(micros_per_million: int) -> str:
    """USD per token as a plain decimal string, as OpenRouter writes prices: 0.00000015."""
    return format(Decimal(micros_per_million).scaleb(-12).normalize(), "f")


def model_object(name: str, model: Model) -> dict[str, Any]:
    """The model's entry in ``GET /v1/models``: OpenAI's fields, then OpenRouter's."""
    info, price = model.info, model.price
    pricing = {"prompt": _per_token(price.prompt), "completion": _per_token(price.completion),
               "request": "0", "image": "0"}
    # Only the prices the catalog names: absent ones bill as prompt / completion.
    for key, value in (("input_cache_read", price.cache_read),
                       ("input_cache_write", price.cache_write),
                       ("internal_reasoning", price.reasoning)):
        if value is not None:
            pricing[key] = _per_token(value)
    return {
        "id": name,
        "object": "model",
        "created": info.created,
        "owned_by": model.provider.name,
        "name": info.name or name,
        "canonical_slug": info.canonical_slug or name,
        "hugging_face_id": info.hugging_face_id,
        "description": info.description,
        "context_length": info.context_length,
        "architecture": {
            "modality": f"{'+'.join(info.input_modalities)}->"
                        f"{'+'.join(info.output_modalities)}",
            "input_modalities": list(info.input_modalities),
            "output_modalities": list(info.output_modalities),
            "tokenizer": info.tokenizer,
            "instruct_type": info.instruct_type,
        },
        "pricing": pricing,
        "top_provider": {
            "context_length": info.top_context_length,
            "max_completion_tokens": info.max_completion_tokens,
            "is_moderated": info.is_moderated,
        },
        "per_request_limits": None if info.per_request_limits is None
        else dict(info.per_request_limits),
        "supported_parameters": list(info.supported_parameters),
        "default_parameters": None if info.default_parameters is None
        else dict(info.default_parameters),
    }


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
        info=_info(table, where),
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
