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
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from shared.inflight import IN_FLIGHT_LIFETIME_MS
from shared.redis_names import DEFAULT_PREFIX, RedisNames
from shared.secrets_env import SecretFileError, with_secrets

_T = TypeVar("_T")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Settings that may also come from a mounted file, as NAME_FILE (shared.secrets_env).
# A new secret setting adds its name here.
SECRETS = (
    "DATABASE_URL", "REDIS_URL", "QNP_ADMIN_TOKEN",
    "QNP_SESSION_SECRET", "QNP_SESSION_SECRET_PREVIOUS",
    "QNP_STRIPE_SECRET_KEY", "QNP_STRIPE_WEBHOOK_SECRET",
    "QNP_OIDC_GOOGLE_CLIENT_SECRET", "QNP_OIDC_APPLE_CLIENT_SECRET",
)


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
    # Shards of the event stream ingest reads; at least the proxies' QNP_EVENT_SHARDS.
    event_shards: int = 1
    # The reservation sweep: how often, and the age past which a reservation is refunded.
    sweep_interval_s: float = 30.0
    sweep_max_age_ms: int = IN_FLIGHT_LIFETIME_MS
    retention_days: int = 30
    maintenance_interval_s: int = 60
    log_level: str = "INFO"

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
        e = _secrets(os.environ if env is None else env)
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
            event_shards=_parse(e, "QNP_EVENT_SHARDS", 1, _int_in(1, 256)),
            sweep_interval_s=_parse(e, "QNP_SWEEP_INTERVAL_S", 30.0, _seconds_in(0.1, 86_400)),
            sweep_max_age_ms=_parse(e, "QNP_SWEEP_MAX_AGE_S", IN_FLIGHT_LIFETIME_MS,
                                    _ms_from_seconds(1, 7 * 86_400)),
            retention_days=_parse(e, "QNP_RETENTION_DAYS", 30, _int_in(1, 3650)),
            maintenance_interval_s=_parse(
                e, "QNP_MAINTENANCE_INTERVAL_S", 60, _int_in(1, 86_400)
            ),
            log_level=_parse(e, "QNP_LOG_LEVEL", "INFO", _log_level),
        )


def _secrets(env: Mapping[str, str]) -> dict[str, str]:
    try:
        return with_secrets(env, SECRETS, lambda path: Path(path).read_text("utf-8"))
    except SecretFileError as e:
        raise SettingsError(str(e)) from None


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


def _seconds_in(low: float, high: float) -> Callable[[str], float]:
    def convert(raw: str) -> float:
        value = float(raw)
        if not low <= value <= high:  # also refuses nan
            raise ValueError(f"must be between {low:g} and {high:g} seconds")
        return value

    return convert


def _ms_from_seconds(low: float, high: float) -> Callable[[str], int]:
    seconds = _seconds_in(low, high)
    return lambda raw: round(seconds(raw) * 1000)


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
