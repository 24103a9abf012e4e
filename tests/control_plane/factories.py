"""Builders for the control-plane tests: settings for a test's own names, and events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from control_plane.settings import Settings
from shared.events import Event, uuid7
from shared.redis_names import RedisNames

ADMIN_TOKEN = "test-admin-token-0123456789"


def make_settings(database_url: str, redis_url: str, names: RedisNames, **extra: str) -> Settings:
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "QNP_REDIS_PREFIX": names.prefix,
        "QNP_ADMIN_TOKEN": ADMIN_TOKEN,
        "QNP_BCRYPT_ROUNDS": "4",
        "QNP_CONSUMER_NAME": "test-consumer",
        "QNP_INGEST_BLOCK_MS": "50",
        **extra,
    }
    return Settings.from_env(env)


def make_event(account_id: str, **overrides: object) -> Event:
    """A successful streamed request received a second ago."""
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    fields: dict[str, object] = {
        "id": str(uuid7()),
        "received_at_us": now_us - 1_000_000,
        "first_byte_at_us": now_us - 750_000,
        "done_at_us": now_us,
        "endpoint": "/v1/chat/completions",
        "status": 200,
        "outcome": "ok",
        "node_id": "node-a",
        "account_id": account_id,
        "key_id": "abcdefghijkl",
        "requested_model": "gpt-4o-mini",
        "served_model": "gpt-4o-mini-2024-07-18",
        "provider": "openai",
        "stream": True,
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "cached_tokens": 2,
        "reasoning_tokens": 1,
        "usage_source": "upstream",
        "cost_micros": 567,
        "source_ip": "203.0.113.9",
    }
    fields.update(overrides)
    return Event(**fields)  # type: ignore[arg-type]


def days_ago(days: int) -> int:
    return int((datetime.now(UTC) - timedelta(days=days)).timestamp() * 1_000_000)
