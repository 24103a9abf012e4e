"""Ingest benchmark: events per second one consumer process writes into Postgres, and
what the proxy's emitter costs per request.

    python -m benchmarks.ingest [--events 100000] [--batch 2000] [--rounds 3]

Uses DATABASE_URL / REDIS_URL when set, else throwaway servers (devstack). Fills the
stream first, then times one Consumer draining it (decode, validate, one unnest INSERT
with its ledger debits and daily rollups per batch, XACK); the same again without the
rollups, in the same run and database, alternating, so their cost is measured on equal
terms (the events spread over several keys and models, as a busy account's do). The
emitter figure is the time ``emit()`` and the batched encode + pipelined XADD take per
event, measured against the same Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
import uuid

import redis.asyncio as aioredis

from benchmarks.databases import scratch_database
from control_plane.connections import open_pool, open_redis
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from control_plane.migrate import migrate
from control_plane.settings import Settings
from devstack.servers import dev_servers
from proxy.emitter import EventEmitter
from shared.events import STREAM_FIELD, Event, uuid7


def _event(account: str, n: int = 0) -> Event:
    now = time.time_ns() // 1000
    return Event(id=str(uuid7()), received_at_us=now - 900_000, first_byte_at_us=now - 500_000,
                 done_at_us=now, endpoint="/v1/chat/completions", status=200, outcome="ok",
                 node_id="bench", account_id=account, key_id=f"benchkey{n % 4:04d}",
                 requested_model="demo-mini", served_model=f"demo-mini-{n % 3}",
                 provider="mock",
                 stream=True, prompt_tokens=120, completion_tokens=340,
                 usage_source="upstream", cost_micros=222, source_ip="203.0.113.7")


async def _fill(client: aioredis.Redis, stream: str, n: int, account: str) -> None:
    for start in range(0, n, 5000):
        pipe = client.pipeline(transaction=False)
        for i in range(min(5000, n - start)):
            pipe.xadd(stream, {STREAM_FIELD: _event(account, start + i).encode()})
        await pipe.execute()


async def bench_ingest(database_url: str, redis_url: str, events: int, batch: int,
                       rollups: bool = True) -> float:
    prefix = f"bench{secrets.token_hex(4)}"
    settings = Settings.from_env({
        "DATABASE_URL": database_url, "REDIS_URL": redis_url, "QNP_REDIS_PREFIX": prefix,
        "QNP_INGEST_BATCH_SIZE": str(batch), "QNP_INGEST_BLOCK_MS": "10",
    })
    pool = await open_pool(settings, min_size=1, max_size=2)
    client = open_redis(settings)
    try:
        account = str(uuid.uuid4())
        consumer = Consumer(settings, pool, client, Metrics(), rollups=rollups)
        # One untimed batch first (group, partitions, prepared statements), filled on its
        # own so that the timed part always has all `events` to read, however small.
        await _fill(client, settings.names.events, batch, account)
        await consumer.run_once()
        await _fill(client, settings.names.events, events, account)
        done = 0
        started = time.perf_counter()
        while True:
            result = await consumer.run_once()
            if result.read == 0:
                break
            done += result.inserted
        return done / (time.perf_counter() - started)
    finally:
        await client.delete(settings.names.events)
        await client.aclose()
        await pool.close()


async def bench_emitter(redis_url: str, events: int) -> tuple[float, float]:
    """(µs per emit() call, µs per event for encode + pipelined XADD)."""
    client = aioredis.Redis.from_url(redis_url)
    stream = f"bench{secrets.token_hex(4)}:events"
    emitter = EventEmitter(client, stream, max_buffer=events + 1, batch_size=512,
                           flush_interval=3600)
    batch = [_event(str(uuid.uuid4())) for _ in range(events)]
    started = time.perf_counter()
    for e in batch:
        emitter.emit(e)
    emit_us = (time.perf_counter() - started) / events * 1e6
    started = time.perf_counter()
    while len(emitter):
        await emitter._send()  # noqa: SLF001 - the send path alone, without the timer
    send_us = (time.perf_counter() - started) / events * 1e6
    await client.delete(stream)
    await client.aclose()
    return emit_us, send_us


async def main(events: int, batch: int, rounds: int) -> None:
    with dev_servers() as (server_url, redis_url):
        async with scratch_database(server_url) as database_url:
            await migrate(database_url)
            rates: dict[bool, list[float]] = {True: [], False: []}
            for i in range(rounds):
                # Each order as often: later rounds write into fuller tables.
                for rollups in ((False, True) if i % 2 == 0 else (True, False)):
                    rates[rollups].append(
                        await bench_ingest(database_url, redis_url, events, batch, rollups))
            emit_us, send_us = await bench_emitter(redis_url, min(events, 50_000))
    with_r, without = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"ingest: {with_r:,.0f} events/s into Postgres with daily rollups, "
          f"{without:,.0f} without ({with_r / without:.1%}); one consumer, batch {batch}, "
          f"median of {rounds} alternating rounds of {events:,} events")
    print(f"emitter: emit() {emit_us:.2f} µs per request on the request path; "
          f"encode + pipelined XADD {send_us:.1f} µs per event in the background task")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.batch, args.rounds))
