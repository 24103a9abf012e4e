"""Settings: defaults, and start-up errors that name the variable at fault."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_an_apple_provider_needs_its_key_instead_of_a_secret() -> None:
    raw = ('[{"name": "apple", "issuer": "https://appleid.apple.com", "client_id": "web.id",'
           ' "apple": {"team_id": "T", "key_id": "K", "private_key_file": "/keys/a.p8"}}]')
    (apple,) = Settings.from_env({**BASE, "QNP_OIDC_PROVIDERS": raw}).oidc_providers
    assert apple.apple is not None and apple.apple.key_id == "K" and apple.client_secret == ""
    with pytest.raises(SettingsError, match="QNP_OIDC_PROVIDERS"):
        Settings.from_env({**BASE, "QNP_OIDC_PROVIDERS": raw.replace('"key_id": "K", ', "")})


def test_event_shards_and_the_reservation_sweep_are_settable() -> None:
    s = Settings.from_env(BASE)
    assert (s.event_shards, s.sweep_interval_s, s.sweep_max_age_ms) == (1, 30.0, 900_000)
    s = Settings.from_env({**BASE, "QNP_EVENT_SHARDS": "4", "QNP_SWEEP_INTERVAL_S": "5",
                           "QNP_SWEEP_MAX_AGE_S": "1200"})
    assert (s.event_shards, s.sweep_interval_s, s.sweep_max_age_ms) == (4, 5.0, 1_200_000)
    assert len(s.names.event_shards(s.event_shards)) == 4


@pytest.mark.parametrize(("variable", "raw"), [
    ("QNP_EVENT_SHARDS", "0"), ("QNP_SWEEP_INTERVAL_S", "0"), ("QNP_SWEEP_INTERVAL_S", "nan"),
    ("QNP_SWEEP_MAX_AGE_S", "0.5"), ("QNP_SWEEP_MAX_AGE_S", "soon"),
])
def test_bad_shard_and_sweep_settings_name_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({**BASE, variable: raw})


def test_secrets_come_from_files(tmp_path: Path) -> None:
    files = {"DATABASE_URL": "postgresql://file/qnp\n", "REDIS_URL": "redis://file:6379/0",
             "QNP_ADMIN_TOKEN": "file-token\n"}
    env: dict[str, str] = {}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        env[f"{name}_FILE"] = str(tmp_path / name)
    s = Settings.from_env(env)
    assert (s.database_url, s.redis_url, s.admin_token) == (
        "postgresql://file/qnp", "redis://file:6379/0", "file-token")


@pytest.mark.parametrize("name", ["DATABASE_URL", "REDIS_URL", "QNP_ADMIN_TOKEN",
                                  "QNP_SESSION_SECRET"])
def test_a_secret_given_twice_or_unreadable_names_the_variables(
    tmp_path: Path, name: str,
) -> None:
    (tmp_path / "value").write_text("v")
    both = {**BASE, name: "direct", f"{name}_FILE": str(tmp_path / "value")}
    with pytest.raises(SettingsError, match=f"{name} and {name}_FILE are both set"):
        Settings.from_env(both)
    missing = {**BASE, f"{name}_FILE": str(tmp_path / "absent")}
    missing.pop(name, None)
    with pytest.raises(SettingsError, match=re.escape(f"{name}_FILE='{tmp_path / 'absent'}'")):
        Settings.from_env(missing)


def test_an_empty_secret_file_is_unset(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    assert Settings.from_env({**BASE, "QNP_ADMIN_TOKEN_FILE": str(tmp_path / "token")}
                             ).admin_token is None
    (tmp_path / "db").write_text("")
    env = {"REDIS_URL": "redis://r", "DATABASE_URL_FILE": str(tmp_path / "db")}
    with pytest.raises(SettingsError, match="DATABASE_URL is required"):
        Settings.from_env(env)


def test_an_invalid_secret_is_refused_without_echoing_it() -> None:
    # Start-up errors end up in logs: the variable is named, its value never shown.
    with pytest.raises(SettingsError, match="QNP_SESSION_SECRET") as refused:
        Settings.from_env({**BASE, "QNP_SESSION_SECRET": "short-canary-secret"})
    assert "short-canary-secret" not in str(refused.value)
    bad = '[{"name": "x", "issuer": "http://evil.example", "client_id": "c", ' \
          '"client_secret": "canary-client-secret"}]'
    with pytest.raises(SettingsError, match="QNP_OIDC_PROVIDERS") as refused:
        Settings.from_env({**BASE, "QNP_OIDC_PROVIDERS": bad})
    assert "canary-client-secret" not in str(refused.value)


def test_a_providers_client_secret_can_come_from_its_own_variable_or_file(
    tmp_path: Path
) -> None:
    """The provider list is configuration; the secret is mounted like the others:
    QNP_OIDC_<NAME>_CLIENT_SECRET or its _FILE (what the Kubernetes manifests give)."""
    raw = ('[{"name": "google", "issuer": "https://accounts.google.com", "client_id": "c"},'
           ' {"name": "corp-idp", "issuer": "https://idp.example", "client_id": "d"}]')
    secret_file = tmp_path / "google"
    secret_file.write_text("from-a-file\n")
    env = {**BASE, "QNP_OIDC_PROVIDERS": raw,
           "QNP_OIDC_GOOGLE_CLIENT_SECRET_FILE": str(secret_file),
           "QNP_OIDC_CORP_IDP_CLIENT_SECRET": "from-the-env"}
    google, corp = Settings.from_env(env).oidc_providers
    assert (google.client_secret, corp.client_secret) == ("from-a-file", "from-the-env")
    with pytest.raises(SettingsError, match="QNP_OIDC_<NAME>_CLIENT_SECRET"):
        Settings.from_env({**BASE, "QNP_OIDC_PROVIDERS": raw})  # no secret anywhere
    missing = {**env, "QNP_OIDC_GOOGLE_CLIENT_SECRET_FILE": str(tmp_path / "absent")}
    with pytest.raises(SettingsError, match="QNP_OIDC_GOOGLE_CLIENT_SECRET_FILE"):
        Settings.from_env(missing)
@pytest.mark.parametrize(("variable", "raw"), [
    ("QNP_STRIPE_JS_URL", "http://js.example.com/v3/"),  # a page's script: https only
    ("QNP_STRIPE_JS_URL", "https://js.stripe.com"),  # an origin, not the script
    ("QNP_STRIPE_PUBLISHABLE_KEY", "sk_test_secret"),  # never a secret key on a page
])
def test_the_card_forms_settings_name_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=variable) as refused:
        Settings.from_env({**BASE, variable: raw})
    assert "sk_test_secret" not in str(refused.value)


def test_the_card_form_needs_both_keys() -> None:
    s = Settings.from_env(BASE)
    assert (s.billing.stripe_js_url, s.billing.page_topups) == (
        "https://js.stripe.com/v3/", False)
    both = Settings.from_env({**BASE, "QNP_STRIPE_SECRET_KEY": "sk_test_x",
                              "QNP_STRIPE_PUBLISHABLE_KEY": "pk_test_x"})
    assert both.billing.page_topups
