"""Control-plane settings: the one place that reads the environment.

Builds a frozen ``Settings`` validated at start-up; every error names the variable at
fault. Everything else receives ``Settings`` as an argument. Must not import other
control-plane modules or ``proxy``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from shared.redis_names import DEFAULT_PREFIX, RedisNames

_T = TypeVar("_T")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A missing or invalid environment variable; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    redis_url: str
    redis_prefix: str = DEFAULT_PREFIX
    admin_token: str | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    bcrypt_rounds: int = 12
    consumer_name: str = "control-plane"
    ingest_batch_size: int = 500
    ingest_block_ms: int = 1000
    # Pending entries of a consumer silent this long are claimed by a live one.
    ingest_claim_idle_ms: int = 60_000
    retention_days: int = 30
    maintenance_interval_s: int = 60
    log_level: str = "INFO"
    # TLS (H8): listeners' certificates and rediss:// trust; see TlsSettings below.
    tls: TlsSettings = field(default_factory=lambda: TlsSettings())

    @property
    def names(self) -> RedisNames:
        return RedisNames(self.redis_prefix)

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]

    def require_admin_token(self) -> str:
        """The admin token, which ``serve`` cannot run without."""
        if not self.admin_token:
            raise SettingsError("QNP_ADMIN_TOKEN is required to serve the admin API")
        return self.admin_token

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; ``env`` defaults to the process environment."""
        e = os.environ if env is None else env
        return cls(
            database_url=_required(e, "DATABASE_URL"),
            redis_url=_required(e, "REDIS_URL"),
            redis_prefix=_parse(e, "QNP_REDIS_PREFIX", DEFAULT_PREFIX, _prefix),
            admin_token=_admin_token(e),
            admin_host=_parse(e, "QNP_ADMIN_HOST", "127.0.0.1", _non_empty),
            admin_port=_parse(e, "QNP_ADMIN_PORT", 8081, _int_in(1, 65535)),
            bcrypt_rounds=_parse(e, "QNP_BCRYPT_ROUNDS", 12, _int_in(4, 31)),
            consumer_name=_parse(
                e, "QNP_CONSUMER_NAME", f"{socket.gethostname()}-{os.getpid()}", _non_empty
            ),
            ingest_batch_size=_parse(e, "QNP_INGEST_BATCH_SIZE", 500, _int_in(1, 10_000)),
            ingest_block_ms=_parse(e, "QNP_INGEST_BLOCK_MS", 1000, _int_in(1, 60_000)),
            ingest_claim_idle_ms=_parse(
                e, "QNP_INGEST_CLAIM_IDLE_MS", 60_000, _int_in(100, 86_400_000)
            ),
            retention_days=_parse(e, "QNP_RETENTION_DAYS", 30, _int_in(1, 3650)),
            maintenance_interval_s=_parse(
                e, "QNP_MAINTENANCE_INTERVAL_S", 60, _int_in(1, 86_400)
            ),
            log_level=_parse(e, "QNP_LOG_LEVEL", "INFO", _log_level),
            tls=TlsSettings.from_env(e),  # TLS (H8)
        )


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise SettingsError(f"{name} is required")
    return value


def _admin_token(env: Mapping[str, str]) -> str | None:
    token = env.get("QNP_ADMIN_TOKEN", "").strip()
    return token or None


def _parse(env: Mapping[str, str], name: str, default: _T, convert: Callable[[str], _T]) -> _T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return convert(raw)
    except ValueError as e:
        raise SettingsError(f"{name}={raw!r} is invalid: {e}") from None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return convert


def _non_empty(raw: str) -> str:
    return raw


def _prefix(raw: str) -> str:
    if any(c.isspace() or c in "{}" for c in raw):
        raise ValueError("must not contain spaces or braces")
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return level


# --- TLS (H8): certificates for the listeners, trust for rediss:// ---------------------


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """One listener's certificate chain and key; both None: it serves plain HTTP."""

    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class TlsSettings:
    web: ListenerTls = ListenerTls()
    admin: ListenerTls = ListenerTls()
    # For a rediss:// REDIS_URL: the CA to trust (None: the system's) and a client
    # certificate for a Redis that asks for one (Redis' default).
    redis_ca: Path | None = None
    redis_cert: Path | None = None
    redis_key: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TlsSettings:
        redis_cert, redis_key = _pair(env, "QNP_REDIS_TLS_CERT", "QNP_REDIS_TLS_KEY")
        return cls(
            web=ListenerTls(*_pair(env, "QNP_WEB_TLS_CERT", "QNP_WEB_TLS_KEY")),
            admin=ListenerTls(*_pair(env, "QNP_ADMIN_TLS_CERT", "QNP_ADMIN_TLS_KEY")),
            redis_ca=_parse(env, "QNP_REDIS_TLS_CA", None, _readable_file),
            redis_cert=redis_cert,
            redis_key=redis_key,
        )


def _readable_file(raw: str) -> Path | None:
    path = Path(raw)
    if not path.is_file():
        raise ValueError("not a readable file")
    return path


def _pair(env: Mapping[str, str], cert: str, key: str) -> tuple[Path | None, Path | None]:
    pair = (_parse(env, cert, None, _readable_file), _parse(env, key, None, _readable_file))
    if (pair[0] is None) != (pair[1] is None):
        raise SettingsError(f"{cert} and {key} go together: set both or neither")
    return pair
