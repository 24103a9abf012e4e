"""Where a canary string (an e-mail, a name, an IP, prompt text) turns up: every key and
value of a Redis database, every row of every Postgres table (partitions included).
Shared by the end-to-end content canaries and the account-deletion canary. Case is
ignored: a canary found in any case is found."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis


async def found_in_redis(redis: aioredis.Redis, needles: list[str]) -> list[str]:
    """"<needle> in Redis key <key>" for each needle in a key's name or value, any type."""
    found = []
    async for name in redis.scan_iter(count=1000):
        kind = (await redis.type(name)).decode()
        if kind == "string":
            dump: object = await redis.get(name)
        elif kind == "hash":
            dump = await redis.hgetall(name)
        elif kind == "list":
            dump = await redis.lrange(name, 0, -1)
        elif kind == "set":
            dump = await redis.smembers(name)
        elif kind == "zset":
            dump = await redis.zrange(name, 0, -1)
        elif kind == "stream":
            dump = await redis.xrange(name)
        else:
            dump = await redis.dump(name)
        text = (repr(name) + repr(dump)).lower()
        found += [f"{n} in Redis key {name!r}" for n in needles if n.lower() in text]
    return found


async def found_in_postgres(conn: asyncpg.Connection | asyncpg.Pool, needles: list[str]
                            ) -> list[str]:
    """"<needle> in Postgres table <table>" for each needle in any column of any row, read as
    the row's text and searched by Postgres itself (no row leaves the server)."""
    tables = await conn.fetch(
        "SELECT format('%I.%I', schemaname, tablename) AS t FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")
    assert tables
    found = []
    for (table,) in tables:
        for needle in needles:
            if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table} t "  # noqa: S608
                                   "WHERE strpos(lower(t::text), lower($1)) > 0)", needle):
                found.append(f"{needle} in Postgres table {table}")
    return found
