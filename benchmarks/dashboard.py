"""Dashboard benchmark: the Overview and Usage pages and the CSV export of a day, for
one account with a busy month of usage.

    python -m benchmarks.dashboard [--rows 1000000] [--requests 200]

Uses throwaway servers (devstack). Fills ``usage_logs`` with ``--rows`` requests of one
account spread over the last 30 days (5 keys, 4 models) with their ledger debits, and
builds their daily rollups, then serves the real web app and times, one request at a
time from a client in the same process, each page (the figure is the round trip: an
upper bound of the server's time) and the CSV export of the busiest day (rows per
second, and how much the process's memory grew while streaming it).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import psutil
from aiohttp import web

from benchmarks.databases import scratch_database
from control_plane import ledger
from control_plane.auth.sessions import COOKIE
from control_plane.migrate import migrate
from control_plane.partitions import create_days
from control_plane.runtime import Stores, open_stores
from control_plane.settings import Settings
from control_plane.web.app import make_web_app
from control_plane.web.state import SESSIONS
from devstack.servers import dev_servers

KEYS = [f"benchkey{n:04d}" for n in range(5)]
MODELS = ["demo-mini", "demo-large", "demo-claude", "demo-gemini"]


async def _fill(conn: asyncpg.Connection, account: uuid.UUID, rows: int) -> None:
    today = datetime.now(UTC).date()
    await create_days(conn, [today - timedelta(days=d) for d in range(32)])
    await conn.execute(
        "INSERT INTO usage_logs (id, received_at, first_byte_at, done_at, account_id, "
        "key_id, endpoint, requested_model, served_model, provider, stream, status, "
        "outcome, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, "
        "usage_source, cost_micros, latency_ms, ttft_ms, source_ip, node_id, "
        "schema_version, attempts, cache_write_tokens) "
        "SELECT gen_random_uuid(), t, t + interval '200 ms', t + interval '900 ms', $1, "
        "($3::text[])[1 + i % 5], '/v1/chat/completions', ($4::text[])[1 + i % 4], "
        "($4::text[])[1 + i % 4], 'mock', i % 2 = 0, 200, 'ok', 100 + i % 900, "
        "50 + i % 500, 0, 0, 'upstream', 20 + i % 400, 900, 200, '203.0.113.7', "
        "'bench', 1, 1, 0 FROM (SELECT i, now() - (i * interval '30 days' / $2) AS t "
        "FROM generate_series(1, $2) AS i) AS s",
        account, rows, KEYS, MODELS)
    await conn.execute(
        "INSERT INTO usage_daily SELECT account_id, (received_at AT TIME ZONE 'UTC')::date, "
        "key_id, served_model, count(*), 0, sum(prompt_tokens), sum(completion_tokens), "
        "0, 0, 0, sum(cost_micros) FROM usage_logs WHERE account_id = $1 "
        "GROUP BY 1, 2, 3, 4", account)
    # Each billed request's ledger debit, as ingest writes it: a busy month of debits.
    await conn.execute(
        "INSERT INTO credit_ledger (account_id, kind, amount_micros, event_id, created_at) "
        "SELECT account_id, 'debit', -cost_micros, id, received_at FROM usage_logs "
        "WHERE account_id = $1", account)
    await conn.execute("ANALYZE credit_ledger")
    await conn.execute("ANALYZE usage_logs")
    await conn.execute("ANALYZE usage_daily")


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1]


async def _time_page(client: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        async with client.get(url) as r:
            await r.read()
            assert r.status == 200, r.status
        times.append((time.perf_counter() - started) * 1000)
    return times


def bench_settings(database_url: str, redis_url: str) -> Settings:
    """The web service's settings for a benchmark: its own port, prefix and secret."""
    return Settings.from_env({
        "DATABASE_URL": database_url, "REDIS_URL": redis_url,
        "QNP_REDIS_PREFIX": f"bench{secrets.token_hex(4)}",
        "QNP_WEB_PORT": str(18000 + secrets.randbelow(2000)),
        "QNP_SESSION_SECRET": secrets.token_urlsafe(32)})


async def seed_account(conn: asyncpg.Connection) -> tuple[uuid.UUID, uuid.UUID]:
    """(account, user): one account and its owner, for the pages to be signed in as."""
    account, user = uuid.uuid4(), uuid.uuid4()
    await conn.execute("INSERT INTO accounts (id, name) VALUES ($1, 'bench')", account)
    await conn.execute("INSERT INTO users (id, email, email_verified) VALUES "
                       "($1, 'bench@example.test', true)", user)
    await conn.execute("INSERT INTO memberships VALUES ($1, $2, 'owner')", account, user)
    return account, user


@asynccontextmanager
async def signed_in(settings: Settings, account: uuid.UUID, user: uuid.UUID
                    ) -> AsyncIterator[tuple[aiohttp.ClientSession, Stores]]:
    """The web app served on 127.0.0.1 and a client signed in as ``user``."""
    async with open_stores(settings) as stores:
        app = make_web_app(settings, stores)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", settings.web_port).start()
        try:
            sid = await app[SESSIONS].create(stores.pool, user, account, "bench")
            jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=[settings.public_url])
            async with aiohttp.ClientSession(settings.public_url, cookie_jar=jar) as client:
                client.cookie_jar.update_cookies({COOKIE: app[SESSIONS].cookie_value(sid)})
                yield client, stores
        finally:
            await runner.cleanup()


async def bench(database_url: str, redis_url: str, rows: int, requests: int) -> list[str]:
    settings = bench_settings(database_url, redis_url)
    conn = await asyncpg.connect(database_url)
    try:
        account, user = await seed_account(conn)
        started = time.perf_counter()
        await _fill(conn, account, rows)
        fill_s = time.perf_counter() - started
        busiest = await conn.fetchval(
            "SELECT day FROM usage_daily WHERE account_id = $1 GROUP BY day "
            "ORDER BY sum(requests) DESC LIMIT 1", account)
    finally:
        await conn.close()
    out = [f"filled {rows:,} usage rows over 30 days in {fill_s:.0f} s"]
    async with signed_in(settings, account, user) as (client, stores):
        await ledger.credit(stores.pool, stores.redis, settings.names, str(account),
                            "topup", 10**12, "bench")  # and the live balance in Redis
        for name, path in (("overview", "/"), ("usage (30 days)", "/usage"),
                           ("usage, one key and model", f"/usage?key={KEYS[1]}"
                            f"&model={MODELS[1]}")):
            await _time_page(client, path, 5)  # warm
            t = await _time_page(client, path, requests)
            out.append(f"{name}: p50 {statistics.median(t):.1f} ms, "
                       f"p99 {_quantile(t, 0.99):.1f} ms ({requests} requests)")
        out.append(await _export(client, busiest.isoformat()))
    return out


async def _export(client: aiohttp.ClientSession, day: str) -> str:
    me = psutil.Process()
    base = peak = me.memory_info().rss
    lines = 0
    started = time.perf_counter()
    async with client.get(f"/usage/export.csv?from={day}&to={day}") as r:
        assert r.status == 200, r.status
        async for chunk in r.content.iter_chunked(1 << 16):
            lines += chunk.count(b"\n")
            peak = max(peak, me.memory_info().rss)
    took = time.perf_counter() - started
    rows = lines - 1
    return (f"CSV export of {day}: {rows:,} rows in {took:.2f} s = {rows / took:,.0f} rows/s, "
            f"memory grew {(peak - base) / 2**20:.1f} MiB while streaming")


Bench = Callable[[str, str, int, int], Awaitable[list[str]]]


async def _main(run: Bench, rows: int, requests: int) -> None:
    with dev_servers() as (server_url, redis_url):
        async with scratch_database(server_url) as database_url:
            await migrate(database_url)
            lines = await run(database_url, redis_url, rows, requests)
    print("\n".join(lines))


def cli(run: Bench, doc: str | None, requests: int) -> None:
    """``--rows`` usage rows for one account on throwaway servers, then ``run``."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=requests)
    args = parser.parse_args()
    asyncio.run(_main(run, args.rows, args.requests))


if __name__ == "__main__":
    cli(bench, __doc__, requests=200)
