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
