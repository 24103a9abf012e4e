"""A catalog mistake stops start-up with a message that names the entry."""

from pathlib import Path

import pytest

from proxy.catalog import CatalogError, load

GOOD = """
[providers.demo]
base_url = "http://127.0.0.1:9/v1/"
api_key_env = "DEMO_KEY"

[models."demo-mini"]
provider = "demo"
upstream_model = "demo-mini-2024"
prompt_price = 0.15
completion_price = 0.60
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return path


def test_catalog_loads_prices_urls_and_provider_key(tmp_path: Path) -> None:
    cat = load(_write(tmp_path, GOOD), {"DEMO_KEY": "sk-secret"})
    model = cat.models["demo-mini"]
    assert model.chat_url == "http://127.0.0.1:9/v1/chat/completions"
    assert model.price.prompt == 150_000 and model.price.completion == 600_000
    assert model.provider.headers["Authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in repr(model.provider)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("prompt_price = 0.15\n", ""), "prompt_price"),
        (lambda t: t.replace("completion_price = 0.60\n", ""), "completion_price"),
        (lambda t: t.replace("0.60", '"free"'), "completion_price"),
        (lambda t: t.replace('provider = "demo"', 'provider = "nobody"'), "unknown provider"),
        (lambda t: t.replace('base_url = "http://127.0.0.1:9/v1/"', ""), "base_url"),
        (lambda t: t + "\n[[broken", "not valid TOML"),
    ],
)
def test_catalog_errors_name_what_is_wrong(tmp_path: Path, edit: object, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        load(_write(tmp_path, edit(GOOD)), {"DEMO_KEY": "k"})  # type: ignore[operator]


def test_missing_provider_key_variable_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="DEMO_KEY"):
        load(_write(tmp_path, GOOD), {})
