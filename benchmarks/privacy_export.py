"""Privacy benchmark: the data export of an account with a busy month, and the privacy
pages that read the same data.

    python -m benchmarks.privacy_export [--rows 1000000] [--requests 20]

Uses throwaway servers (devstack). Fills ``usage_logs`` with ``--rows`` requests of one
account over the last 30 days with their ledger debits and daily rollups (the
dashboard benchmark's fill), serves the real web app, downloads
``/api/v1/account/export`` from a client in the same process that keeps nothing but a
count, and reports rows per second and how much the process's resident memory grew
while the document streamed (server and client together: an upper bound of the
server's). Then times ``/settings/privacy/summary`` and ``/settings/privacy/sharing``.
"""

from __future__ import annotations

import statistics
import time

import aiohttp
import asyncpg
import psutil

from benchmarks.dashboard import (
    _fill,
    _time_page,
    bench_settings,
    cli,
    seed_account,
    signed_in,
)


async def _export(client: aiohttp.ClientSession) -> str:
    me = psutil.Process()
    base = peak = me.memory_info().rss
    lines = size = 0
    tail = b""
    started = time.perf_counter()
    async with client.get("/api/v1/account/export") as r:
        assert r.status == 200, r.status
        async for chunk in r.content.iter_chunked(1 << 16):
            lines += chunk.count(b"\n")
            size += len(chunk)
            tail = (tail + chunk)[-64:]
            peak = max(peak, me.memory_info().rss)
    took = time.perf_counter() - started
    assert tail.endswith(b"}\n"), "the document must be complete"
    rows = lines - 2  # the head line and the closing brace
    return (f"export: {rows:,} rows ({size / 2**20:,.0f} MiB) in {took:.1f} s = "
            f"{rows / took:,.0f} rows/s, memory grew {(peak - base) / 2**20:.1f} MiB "
            "while streaming")


async def bench(database_url: str, redis_url: str, rows: int, requests: int) -> list[str]:
    settings = bench_settings(database_url, redis_url)
    conn = await asyncpg.connect(database_url)
    try:
        account, user = await seed_account(conn)
        started = time.perf_counter()
        await _fill(conn, account, rows)
        fill_s = time.perf_counter() - started
    finally:
        await conn.close()
    out = [f"filled {rows:,} usage rows and ledger debits over 30 days in {fill_s:.0f} s"]
    async with signed_in(settings, account, user) as (client, _):
        out.append(await _export(client))
        for name, path in (("summary page", "/settings/privacy/summary"),
                           ("sharing page", "/settings/privacy/sharing")):
            await _time_page(client, path, 2)  # warm
            t = await _time_page(client, path, requests)
            out.append(f"{name}: p50 {statistics.median(t):.1f} ms, "
                       f"max {max(t):.1f} ms ({requests} requests)")
    return out


if __name__ == "__main__":
    cli(bench, __doc__, requests=20)
