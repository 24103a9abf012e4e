"""A sharded event stream on a real 3-master Redis Cluster, through a consumer kill -9.

The proxy's emitter spreads events over three shards, whose hash tags put them on
three different masters. An ingest consumer process reads a batch from every shard
and cannot store it (Postgres behind a frozen gate), and is killed with SIGKILL. A
second consumer claims what the first held on each shard, reads the entries never
delivered and those added meanwhile: every event ends up exactly once in
``usage_logs`` with one debit, nothing stays pending on any shard, and nothing is
dead-lettered.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio.cluster import RedisCluster

from control_plane.ingest import MAX_DELIVERIES, Consumer
from control_plane.metrics import Metrics
from proxy.emitter import EventEmitter
from shared.events import STREAM_FIELD
from shared.redis_names import RedisNames
from tests.chaos.cluster import READY, start_cluster
from tests.chaos.conftest import control_plane_env, debit_count, stored_ids, wait_for
from tests.chaos.gate import Gate
from tests.control_plane.factories import make_event, make_settings
from tests.support import ModuleProcess

pytestmark = pytest.mark.timeout(180)

SHARDS = 3
HELD = 3000  # events sent while the first consumer cannot store
LATER = 600  # events added while the second consumer runs


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[RedisCluster]:
    async with start_cluster() as client:
        yield client


def _node_url(cluster: RedisCluster) -> str:
    node = cluster.get_default_node()
    return f"redis://{node.host}:{node.port}/0"


async def _emit(cluster: RedisCluster, names: RedisNames, account: str, count: int
                ) -> list[str]:
    """``count`` events through the proxy's emitter, sharded, until all are sent."""
    sent = [0]

    def on_sent(n: int) -> None:
        sent[0] += n

    emitter = EventEmitter(cluster, names.event_streams(SHARDS),  # type: ignore[arg-type]
                           max_buffer=count, batch_size=200, flush_interval=0.005,
                           on_sent=on_sent)
    task = asyncio.create_task(emitter.run())
    events = [make_event(account) for _ in range(count)]
    for event in events:
        emitter.emit(event)
    try:
        await wait_for(lambda: _true(sent[0] == count), "the emitter sends every event")
    finally:
        emitter.stop()
        await asyncio.wait_for(task, 10)
        await emitter.close(deadline=1)
    return [event.id for event in events]


async def _true(value: bool) -> bool:
    return value


async def _pending(cluster: RedisCluster, names: RedisNames) -> dict[str, dict[str, int]]:
    """Per shard stream: entries pending, per consumer."""
    out: dict[str, dict[str, int]] = {}
    for stream in names.event_streams(SHARDS):
        info = await cluster.xpending(stream, names.ingest_group)
        out[stream] = {c["name"].decode(): int(c["pending"]) for c in info["consumers"] or []}
    return out


async def test_shards_live_on_different_masters(cluster: RedisCluster) -> None:
    names = RedisNames(f"qnpshard{uuid.uuid4().hex[:6]}")
    shards = names.event_shards(SHARDS)
    nodes = {cluster.get_node_from_key(s.stream).name for s in shards}
    assert len(nodes) == SHARDS  # one master each: the cluster spreads the stream
    for shard in shards:  # a shard's dead letters share its slot (one MULTI)
        assert cluster.keyslot(shard.dead) == cluster.keyslot(shard.stream)


async def test_a_sharded_stream_is_ingested_exactly_once_through_a_consumer_kill(
    tmp_path: Path, migrated_url: str, cluster: RedisCluster,
) -> None:
    names = RedisNames(f"qnpshard{uuid.uuid4().hex[:6]}")
    account = str(uuid.uuid4())
    extra = {"QNP_EVENT_SHARDS": str(SHARDS)}
    gate = await Gate(migrated_url).start()
    first_env = control_plane_env(gate.url, _node_url(cluster), names.prefix,
                                  QNP_CONSUMER_NAME="ingest-a", **extra)
    first = ModuleProcess("tests.chaos.cluster", log_path=tmp_path / "first.log",
                          env=first_env)
    try:
        await asyncio.to_thread(first.wait_for_log, READY)
        gate.freeze()  # Postgres hangs: the consumer reads batches it cannot store
        ids = await _emit(cluster, names, account, HELD)
        on_shards = [int(await cluster.xlen(s)) for s in names.event_streams(SHARDS)]
        assert sum(on_shards) == HELD and all(on_shards)  # spread over every shard

        async def holds_some_of_each() -> bool:
            held = await _pending(cluster, names)
            return all(held[s].get("ingest-a") for s in held)

        # Each shard's loop read a batch and waits on Postgres with it.
        await wait_for(holds_some_of_each, "the first consumer reads from every shard")
        first.stop(signal.SIGKILL)
        held = await _pending(cluster, names)
    finally:
        first.stop(signal.SIGKILL)
        await gate.close()
    assert await stored_ids(migrated_url, account) == []

    second_env = control_plane_env(migrated_url, _node_url(cluster), names.prefix,
                                   QNP_CONSUMER_NAME="ingest-b",
                                   QNP_INGEST_CLAIM_IDLE_MS="500", **extra)
    with ModuleProcess("tests.chaos.cluster", log_path=tmp_path / "second.log",
                       env=second_env) as second:
        await asyncio.to_thread(second.wait_for_log, READY)
        ids += await _emit(cluster, names, account, LATER)

        async def all_stored() -> bool:
            held = await _pending(cluster, names)
            return (not any(sum(c.values()) for c in held.values())
                    and len(await stored_ids(migrated_url, account)) >= HELD + LATER)

        await wait_for(all_stored, "the second consumer claims and stores every entry")
        assert second.stop() == 0
        log = second.log_text()

    assert all(c == {"ingest-a": c["ingest-a"]} for c in held.values())  # at the kill
    stored = await stored_ids(migrated_url, account)
    assert len(stored) == HELD + LATER and set(stored) == set(ids)  # none lost or doubled
    assert await debit_count(migrated_url, account) == HELD + LATER
    for stream, by_consumer in held.items():  # each shard's stale entries were claimed
        claimed = f"ingest claimed stale entries count={by_consumer['ingest-a']} "
        assert f"{claimed}stream={stream}" in log
    for shard in names.event_shards(SHARDS):
        assert await cluster.exists(shard.dead) == 0


async def test_a_poison_entry_is_dead_lettered_on_its_shard_of_the_cluster(
    migrated_url: str, cluster: RedisCluster,
) -> None:
    names = RedisNames(f"qnpshard{uuid.uuid4().hex[:6]}")
    settings = make_settings(migrated_url, _node_url(cluster), names,
                             QNP_EVENT_SHARDS=str(SHARDS))
    shard = names.event_shards(SHARDS)[2]
    await cluster.xadd(shard.stream, {STREAM_FIELD: b"not an event"})
    pool = await asyncpg.create_pool(migrated_url, min_size=1, max_size=2)
    try:
        consumer = Consumer(settings, pool, cluster, Metrics())  # type: ignore[arg-type]
        results = [await consumer.run_once(2) for _ in range(MAX_DELIVERIES)]
    finally:
        await pool.close()
    assert results[-1].dead_lettered == 1  # XADD to its dead letters + XACK, one MULTI
    assert await cluster.xlen(shard.dead) == 1
    info = await cluster.xpending(shard.stream, names.ingest_group)
    assert int(info["pending"]) == 0
