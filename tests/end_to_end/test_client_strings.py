"""What a client names cannot keep its request out of Postgres (issue 10, finding 5).

A model name with a NUL (Postgres ``text`` refuses it) or eight million characters
long, sent through the real proxy, ends as exactly one ``usage_logs`` row, bounded and
cleaned, and nothing reaches the dead-letter stream. An event carrying a NUL that an
older proxy wrote straight to the stream is stored cleaned as well.
"""

from __future__ import annotations

import io
import time

import aiohttp
import orjson
import redis.asyncio as aioredis

from shared.events import STREAM_FIELD, TEXT_MAX, Event, uuid7_str
from tests.end_to_end.conftest import Stack, _rows


def _now() -> int:
    return time.time_ns() // 1000


async def _account(stack: Stack) -> tuple[str, str]:
    account = await stack.admin("POST", "/admin/accounts", {"name": "strings"})
    await stack.admin("POST", f"/admin/accounts/{account['id']}/credit",
                      {"amount_micros": 1_000_000, "reference": "strings-topup"})
    issued = await stack.admin("POST", f"/admin/accounts/{account['id']}/keys", {"name": "k"})
    return str(account["id"]), str(issued["key"])


async def test_nul_and_huge_model_names_each_end_as_one_clean_row(
    stack: Stack, migrated_url: str, redis: aioredis.Redis,
) -> None:
    account, key = await _account(stack)
    names = {"demo\x00mini": "demomini", "m" * 8_000_000: "m" * TEXT_MAX}
    ids = {}
    async with aiohttp.ClientSession() as s:
        for model, clean in names.items():
            body = orjson.dumps({"model": model, "messages": [{"role": "user",
                                                               "content": "hi"}]})
            async with s.post(stack.proxy_url + "/chat/completions", data=io.BytesIO(body),
                              headers={"Authorization": f"Bearer {key}",
                                       "Content-Type": "application/json"}) as r:
                assert r.status == 404
                ids[r.headers["x-request-id"]] = clean
    # An older proxy's event, NUL and all, written to the stream as it would have.
    old = Event(id=uuid7_str(), received_at_us=_now(), done_at_us=_now(),
                endpoint="/v1/chat/completions", status=404, outcome="not_found",
                node_id="old-proxy", account_id=account, requested_model="old\x00name")
    await redis.xadd(stack.names.events, {STREAM_FIELD: old.encode()})
    ids[old.id] = "oldname"

    rows = await _rows(migrated_url, account, len(ids))
    assert len(rows) == len(ids), "every request must be in Postgres, once"
    assert {str(r["id"]): r["requested_model"] for r in rows} == ids
    assert await redis.xlen(stack.names.events_dead) == 0
