"""The proxy's secrets from mounted files: REDIS_URL and every catalog key variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.settings import SettingsError, load

CATALOG = """
[providers.demo]
base_url = "http://127.0.0.1:9/v1/"
api_key_env = "DEMO_PROVIDER_KEY"

[models."demo-mini"]
provider = "demo"
upstream_model = "demo-mini-2024"
prompt_price = 0.15
completion_price = 0.60
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG)
    (tmp_path / "redis-url").write_text("redis://from-file:6379/0\n")
    (tmp_path / "demo-key").write_text("sk-from-file\n")
    return {"QNP_CATALOG": str(catalog), "REDIS_URL_FILE": str(tmp_path / "redis-url"),
            "DEMO_PROVIDER_KEY_FILE": str(tmp_path / "demo-key"),
            "QNP_SPOOL_DIR": str(tmp_path / "spool")}


def test_redis_url_and_provider_keys_come_from_files(env: dict[str, str]) -> None:
    settings = load(env)
    assert settings.redis_url == "redis://from-file:6379/0"
    headers = settings.catalog.models["demo-mini"].provider.headers
    assert headers["Authorization"] == "Bearer sk-from-file"  # newline stripped


def test_the_variables_themselves_still_work(env: dict[str, str]) -> None:
    plain = {k: v for k, v in env.items() if not k.endswith("_FILE")}
    settings = load({**plain, "REDIS_URL": "redis://plain:6379/0", "DEMO_PROVIDER_KEY": "sk-p"})
    assert settings.redis_url == "redis://plain:6379/0"
    assert settings.catalog.models["demo-mini"].provider.headers["Authorization"] == \
        "Bearer sk-p"


@pytest.mark.parametrize(("edit", "message"), [
    ({"REDIS_URL": "redis://also:6379/0"}, "REDIS_URL and REDIS_URL_FILE are both set"),
    ({"DEMO_PROVIDER_KEY": "sk-also"},
     "DEMO_PROVIDER_KEY and DEMO_PROVIDER_KEY_FILE are both set"),
    ({"REDIS_URL_FILE": "/nonexistent/redis-url"}, "REDIS_URL_FILE='/nonexistent/redis-url'"),
    ({"DEMO_PROVIDER_KEY_FILE": "/nonexistent/k"}, "DEMO_PROVIDER_KEY_FILE='/nonexistent/k'"),
])
def test_a_secret_given_twice_or_unreadable_stops_start_up(
    env: dict[str, str], edit: dict[str, str], message: str,
) -> None:
    with pytest.raises(SettingsError, match=message):
        load({**env, **edit})


def test_an_empty_key_file_is_an_unset_key(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "demo-key").write_text("")
    with pytest.raises(SettingsError, match="DEMO_PROVIDER_KEY"):
        load(env)
    (tmp_path / "redis-url").write_text("\n")
    with pytest.raises(SettingsError, match="REDIS_URL is not set"):
        load(env)
