"""Settings: defaults, and start-up errors that name the variable at fault."""

from __future__ import annotations

import pytest

from control_plane.settings import Settings, SettingsError

BASE = {"DATABASE_URL": "postgresql://db/qnp", "REDIS_URL": "redis://r:6379/0"}


def test_defaults() -> None:
    s = Settings.from_env(BASE)
    assert (s.redis_prefix, s.admin_host, s.admin_port, s.bcrypt_rounds) == (
        "qnp", "127.0.0.1", 8081, 12,
    )
    assert (s.ingest_batch_size, s.ingest_block_ms, s.log_level) == (500, 1000, "INFO")
    assert s.admin_token is None
    assert s.consumer_name  # hostname-pid
    assert s.names.events == "qnp:events"
    assert (s.web_host, s.web_port, s.shutdown_grace_s) == ("127.0.0.1", 8082, 10.0)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"REDIS_URL": "redis://r"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql://db"}, "REDIS_URL"),
        ({**BASE, "QNP_BCRYPT_ROUNDS": "3"}, "QNP_BCRYPT_ROUNDS"),
        ({**BASE, "QNP_ADMIN_PORT": "http"}, "QNP_ADMIN_PORT"),
        ({**BASE, "QNP_INGEST_BATCH_SIZE": "0"}, "QNP_INGEST_BATCH_SIZE"),
        ({**BASE, "QNP_LOG_LEVEL": "loud"}, "QNP_LOG_LEVEL"),
        ({**BASE, "QNP_WEB_PORT": "0"}, "QNP_WEB_PORT"),
        ({**BASE, "QNP_SHUTDOWN_GRACE": "nan"}, "QNP_SHUTDOWN_GRACE"),
        ({**BASE, "QNP_SHUTDOWN_GRACE": "-1"}, "QNP_SHUTDOWN_GRACE"),
        ({**BASE, "QNP_REDIS_PREFIX": "a b"}, "QNP_REDIS_PREFIX"),
    ],
)
def test_errors_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_serve_needs_an_admin_token() -> None:
    with pytest.raises(SettingsError, match="QNP_ADMIN_TOKEN"):
        Settings.from_env(BASE).require_admin_token()
    assert Settings.from_env({**BASE, "QNP_ADMIN_TOKEN": "t0k"}).require_admin_token() == "t0k"


@pytest.mark.parametrize(
    ("url", "ok"),
    [("https://qnp.example", True), ("http://127.0.0.1:8082", True),
     ("http://localhost:9", True), ("http://qnp.example", False),
     ("http://10.0.0.1:8082", False), ("https://qnp.example/app", False), ("ftp://x", False)],
)
def test_the_public_url_is_https_except_on_loopback(url: str, ok: bool) -> None:
    env = {**BASE, "QNP_PUBLIC_URL": url}
    if ok:
        assert Settings.from_env(env).public_url == url
    else:
        with pytest.raises(SettingsError, match="QNP_PUBLIC_URL"):
            Settings.from_env(env)


def test_a_session_secret_is_required_in_production_only() -> None:
    prod = Settings.from_env({**BASE, "QNP_PUBLIC_URL": "https://qnp.example"})
    with pytest.raises(SettingsError, match="QNP_SESSION_SECRET"):
        prod.require_session_secret()
    dev = Settings.from_env(BASE)
    assert len(dev.require_session_secret()) >= 32
    assert dev.require_session_secret() not in repr(dev)
    with pytest.raises(SettingsError, match="QNP_SESSION_SECRET"):
        Settings.from_env({**BASE, "QNP_SESSION_SECRET": "short"})


def test_oidc_providers_are_read_from_json() -> None:
    raw = ('[{"name": "google", "issuer": "https://accounts.google.com", "client_id": "c",'
           ' "client_secret": "s3cret", "label": "Google"},'
           ' {"name": "dev", "issuer": "http://127.0.0.1:9400", "client_id": "d",'
           ' "client_secret": "x"}]')
    providers = Settings.from_env({**BASE, "QNP_OIDC_PROVIDERS": raw}).oidc_providers
    assert [(p.name, p.label) for p in providers] == [("google", "Google"), ("dev", "dev")]
    assert providers[0].discovery_url == (
        "https://accounts.google.com/.well-known/openid-configuration")
    assert "s3cret" not in repr(providers)
    for bad in ('{"name": "x"}', '[{"name": "x"}]', "not json",
                '[{"name": "A B", "issuer": "https://i", "client_id": "c", '
                '"client_secret": "s"}]',
                '[{"name": "x", "issuer": "http://evil.example", "client_id": "c", '
                '"client_secret": "s"}]'):
        with pytest.raises(SettingsError, match="QNP_OIDC_PROVIDERS"):
            Settings.from_env({**BASE, "QNP_OIDC_PROVIDERS": bad})
