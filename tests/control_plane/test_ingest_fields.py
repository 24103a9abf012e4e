"""Event fields added within schema version 1 reach ``usage_logs``: ``attempts`` and
``cache_write_tokens`` as the proxy sent them, and their defaults for an event from a
proxy that predates them."""

from __future__ import annotations

import uuid

import asyncpg
import orjson
import redis.asyncio as aioredis

from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from control_plane.settings import Settings
from shared.events import STREAM_FIELD
from tests.control_plane.factories import make_event


async def test_attempts_and_cache_write_tokens_are_stored(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, metrics: Metrics,
    account_id: str,
) -> None:
    retried = make_event(account_id, attempts=3, cache_write_tokens=7, prompt_tokens=40)
    older = make_event(account_id).to_dict()
    del older["attempts"], older["cache_write_tokens"]  # as a proxy before them sends it
    too_many = make_event(account_id, attempts=2**31)
    for payload in (retried.encode(), orjson.dumps(older), too_many.encode()):
        await rclient.xadd(settings.names.events, {STREAM_FIELD: payload})

    consumer = Consumer(settings, pool, rclient, metrics)
    result = await consumer.run_once()

    assert (result.read, result.inserted) == (3, 2)
    rows = await pool.fetch(
        "SELECT id, attempts, cache_write_tokens, prompt_tokens FROM usage_logs "
        "WHERE account_id = $1", uuid.UUID(account_id))
    by_id = {str(r["id"]): r for r in rows}
    assert set(by_id) == {retried.id, older["id"]}
    assert (by_id[retried.id]["attempts"], by_id[retried.id]["cache_write_tokens"],
            by_id[retried.id]["prompt_tokens"]) == (3, 7, 40)
    assert (by_id[older["id"]]["attempts"], by_id[older["id"]]["cache_write_tokens"]) == (1, 0)
    # The out-of-range one is refused with a reason, not written truncated.
    assert result.retrying == 1
