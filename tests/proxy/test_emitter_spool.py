"""The emitter's circuit breaker and disk spool: Redis down, refusing or slow, no event
is lost or blocks a request, and everything spooled reaches the stream afterwards."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from devstack.servers import start_redis
from proxy.emitter import EventEmitter
from proxy.spool import Spool
from shared.events import STREAM_FIELD, Event, decode, uuid7
from shared.redis_names import RedisNames
from tests.chaos.gate import Gate


def _event(n: int = 0) -> Event:
    return Event(id=str(uuid7()), received_at_us=1, done_at_us=2 + n,
                 endpoint="/v1/chat/completions", status=200, outcome="ok", node_id="t")


class Counts:
    def __init__(self) -> None:
        self.sent = self.dropped = self.spooled = self.replayed = 0

    def hooks(self) -> dict[str, object]:
        def add(name: str) -> object:
            def inc(n: int) -> None:
                setattr(self, name, getattr(self, name) + n)
            return inc
        return {f"on_{k}": add(k) for k in ("sent", "dropped", "spooled", "replayed")}


async def _ids_on_stream(client: aioredis.Redis, stream: str) -> list[str]:
    return [decode(f[STREAM_FIELD]).id for _, f in await client.xrange(stream)]


async def _until(check: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met before the hang guard"
        await asyncio.sleep(0.02)


@pytest.fixture
async def gate(redis_url: str) -> AsyncIterator[Gate]:
    g = await Gate(redis_url).start()
    yield g
    await g.close()


def test_spool_reads_oldest_first_and_bounds_its_size(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100, segment_bytes=20)
    assert spool.open() == 0
    assert spool.append([b"a" * 9, b"b" * 9]) == 2   # 20 bytes: fills a segment
    assert spool.append([b"c" * 9]) == 1
    assert spool.append([b"x" * 60, b"y" * 60]) == 1  # only what fits is taken
    assert len(spool) == 4
    first = spool.read(10)
    assert first is not None and first.records == [b"a" * 9, b"b" * 9]
    spool.consume(first)
    second = spool.read(10)
    assert second is not None and second.records == [b"c" * 9, b"x" * 60]
    spool.consume(second)
    assert spool.read(10) is None and len(spool) == 0
    spool.close()
    assert not tmp_path.exists()  # an empty spool leaves nothing behind


def test_a_dead_process_spool_is_adopted_and_a_torn_record_skipped(tmp_path: Path) -> None:
    dead_pid = 2**22 + 17  # above pid_max on most systems: certainly not running
    (tmp_path / f"{dead_pid}.lock").touch()
    (tmp_path / f"{dead_pid}-00000000000000000001.spool").write_bytes(b"one\ntwo\ntor")
    live = Spool(tmp_path / "x", max_bytes=1000)  # another folder: not adopted by it
    live.open()
    spool = Spool(tmp_path, max_bytes=1000)
    assert spool.open() == 2
    chunk = spool.read(10)
    assert chunk is not None and chunk.records == [b"one", b"two"]
    spool.consume(chunk)
    spool.close()
    live.close()
    assert list(tmp_path.glob("*.spool")) == []


async def test_redis_down_events_are_spooled_then_replayed_in_order(
    tmp_path: Path, gate: Gate, redis: aioredis.Redis, redis_names: RedisNames,
) -> None:
    client = aioredis.Redis.from_url(gate.url, socket_connect_timeout=0.5)
    spool = Spool(tmp_path / "spool", max_bytes=10_000_000)
    spool.open()
    counts = Counts()
    emitter = EventEmitter(client, redis_names.events, max_buffer=10_000, batch_size=50,
                           flush_interval=0.005, spool=spool, **counts.hooks())  # type: ignore[arg-type]
    tasks = [asyncio.create_task(emitter.run()), asyncio.create_task(emitter.replay())]
    try:
        before = [_event() for _ in range(20)]
        for e in before:
            emitter.emit(e)
        await _until(lambda: _len_is(redis, redis_names.events, 20))
        await gate.cut()
        during = [_event() for _ in range(300)]
        for e in during:
            emitter.emit(e)  # never awaits, never raises, whatever Redis does
        await _until(lambda: _true(counts.spooled == 300))
        assert not emitter.healthy and len(emitter) == 0
        assert list((tmp_path / "spool").glob("*.spool"))  # really on disk
        await gate.open()
        await _until(lambda: _len_is(redis, redis_names.events, 320))
    finally:
        emitter.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        await emitter.close(deadline=1)
        await client.aclose()
    ids = await _ids_on_stream(redis, redis_names.events)
    assert ids == [e.id for e in before + during]  # none lost, none doubled, oldest first
    assert (counts.replayed, counts.dropped, emitter.healthy) == (300, 0, True)
    assert not (tmp_path / "spool").exists()


async def _len_is(client: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await client.xlen(stream)) >= n


async def _true(value: bool) -> bool:
    return value


async def test_shutdown_with_redis_down_spools_and_the_next_process_replays(
    tmp_path: Path, gate: Gate, redis: aioredis.Redis, redis_names: RedisNames,
) -> None:
    client = aioredis.Redis.from_url(gate.url, socket_connect_timeout=0.5)
    await gate.cut()
    spool = Spool(tmp_path, max_bytes=10_000_000)
    spool.open()
    counts = Counts()
    emitter = EventEmitter(client, redis_names.events, max_buffer=1000, batch_size=64,
                           flush_interval=60, spool=spool, **counts.hooks())  # type: ignore[arg-type]
    events = [_event() for _ in range(100)]
    for e in events:
        emitter.emit(e)
    await emitter.close(deadline=0.5)  # SIGTERM path: nothing sent, everything spooled
    await client.aclose()
    assert (counts.spooled, counts.dropped) == (100, 0)
    os.rename(tmp_path / f"{os.getpid()}.lock", tmp_path / "99999999.lock")
    for path in tmp_path.glob(f"{os.getpid()}-*.spool"):  # as if another pid wrote them
        path.rename(tmp_path / path.name.replace(str(os.getpid()), "99999999", 1))

    await gate.open()
    client = aioredis.Redis.from_url(gate.url)
    spool = Spool(tmp_path, max_bytes=10_000_000)
    assert spool.open() == 100
    emitter = EventEmitter(client, redis_names.events, max_buffer=1000, batch_size=64,
                           flush_interval=0.005, spool=spool)
    task = asyncio.create_task(emitter.replay())
    await _until(lambda: _len_is(redis, redis_names.events, 100))
    emitter.stop()
    await asyncio.wait_for(task, 5)
    await emitter.close(deadline=1)
    await client.aclose()
    assert await _ids_on_stream(redis, redis_names.events) == [e.id for e in events]


async def test_out_of_memory_redis_opens_the_breaker_until_it_takes_writes(
    tmp_path: Path,
) -> None:
    with start_redis() as server:
        client = aioredis.Redis.from_url(server.url)
        await client.xadd("s", {"warm": "up"})
        await client.config_set("maxmemory", 1)
        spool = Spool(tmp_path, max_bytes=10_000_000)
        spool.open()
        counts = Counts()
        emitter = EventEmitter(client, "s", max_buffer=1000, batch_size=10,
                               flush_interval=0.005, spool=spool, **counts.hooks())  # type: ignore[arg-type]
        tasks = [asyncio.create_task(emitter.run()), asyncio.create_task(emitter.replay())]
        for _ in range(30):
            emitter.emit(_event())
        await _until(lambda: _true(counts.spooled == 30))
        assert not emitter.healthy
        await client.config_set("maxmemory", 0)
        await _until(lambda: _len_is(client, "s", 31))
        emitter.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        await emitter.close(deadline=1)
        await client.aclose()
    assert (counts.sent + counts.replayed, counts.dropped) == (30, 0)


async def test_a_full_spool_drops_with_a_count_and_a_log_line(
    tmp_path: Path, gate: Gate, redis_names: RedisNames, caplog: pytest.LogCaptureFixture,
) -> None:
    client = aioredis.Redis.from_url(gate.url, socket_connect_timeout=0.5)
    await gate.cut()
    one = len(_event().encode()) + 1
    spool = Spool(tmp_path, max_bytes=one * 5)
    spool.open()
    counts = Counts()
    emitter = EventEmitter(client, redis_names.events, max_buffer=1000, batch_size=100,
                           flush_interval=60, spool=spool, **counts.hooks())  # type: ignore[arg-type]
    for _ in range(8):
        emitter.emit(_event())
    await emitter.close(deadline=0.2)
    await client.aclose()
    assert (counts.spooled, counts.dropped) == (5, 3)
    assert "event spool full: dropped 3 events" in caplog.text


async def test_sharded_events_go_to_every_shard_in_turn_each_exactly_once(
    redis: aioredis.Redis, redis_names: RedisNames,
) -> None:
    streams = redis_names.event_streams(3)
    assert len(set(streams)) == 3 and redis_names.events not in streams
    counts = Counts()
    emitter = EventEmitter(redis, streams, max_buffer=10_000, batch_size=10,
                           flush_interval=0.005, **counts.hooks())  # type: ignore[arg-type]
    task = asyncio.create_task(emitter.run())
    batches: list[list[Event]] = []
    try:
        for n in range(7):  # one full batch at a time, each sent before the next
            batch = [_event() for _ in range(10)]
            batches.append(batch)
            for e in batch:
                emitter.emit(e)
            await _until(lambda n=n: _true(counts.sent == 10 * (n + 1)))  # type: ignore[misc]
    finally:
        emitter.stop()
        await asyncio.wait_for(task, 5)
        await emitter.close(deadline=1)
    on = [await _ids_on_stream(redis, s) for s in streams]
    # Batch k went whole to shard k mod 3: round robin, one pipeline per batch.
    for i in range(3):
        assert on[i] == [e.id for k, b in enumerate(batches) if k % 3 == i for e in b]
    assert await redis.exists(redis_names.events) == 0  # nothing on the unsharded name


async def test_a_batch_that_failed_is_sent_again_to_the_same_shard(
    gate: Gate, redis: aioredis.Redis, redis_names: RedisNames,
    caplog: pytest.LogCaptureFixture,
) -> None:
    streams = redis_names.event_streams(2)
    client = aioredis.Redis.from_url(gate.url, socket_connect_timeout=0.5)
    counts = Counts()
    emitter = EventEmitter(client, streams, max_buffer=1000, batch_size=5,
                           flush_interval=0.005, **counts.hooks())  # type: ignore[arg-type]
    task = asyncio.create_task(emitter.run())
    first, second, third = ([_event() for _ in range(5)] for _ in range(3))
    try:
        for e in first:
            emitter.emit(e)
        await _until(lambda: _true(counts.sent == 5))
        await gate.cut()
        for e in second:
            emitter.emit(e)  # no spool: the batch waits at the head and is retried
        await _until(lambda: _true("cannot send events" in caplog.text))
        await gate.open()
        await _until(lambda: _true(counts.sent == 10))
        for e in third:
            emitter.emit(e)
        await _until(lambda: _true(counts.sent == 15))
    finally:
        emitter.stop()
        await asyncio.wait_for(task, 5)
        await emitter.close(deadline=1)
        await client.aclose()
    # The failed attempts did not move the turn on: the shards still alternate.
    assert await _ids_on_stream(redis, streams[0]) == [e.id for e in first + third]
    assert await _ids_on_stream(redis, streams[1]) == [e.id for e in second]
