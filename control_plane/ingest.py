"""The ingest consumer: metadata events from the Redis stream into ``usage_logs``.

Reads batches through the consumer group, writes each batch to Postgres in one
transaction that skips events already stored and debits the credit ledger for the new
billed ones, and only then ``XACK``s; so an event is stored (and billed) exactly once
however often it is delivered. An entry that cannot be decoded or stored stays pending
and is retried; once it has been delivered ``MAX_DELIVERIES`` times it goes to the
dead-letter stream with the reason and is acked. A batch with one bad row is written
row by row under savepoints, so the rest never wait for it. When Postgres or Redis is
unavailable nothing is acked or dead-lettered: the entries stay pending and are re-read
after a back-off. Logs entry ids and reasons, never entry contents. Never imports
``proxy``.

A sharded stream (``QNP_EVENT_SHARDS`` > 1) is read shard by shard: the group exists on
every shard, and each shard has its own loop (its own blocking read, pending list,
stale-entry claiming and dead-letter stream), so a quiet shard never delays a busy one
and every command touches one shard's keys (one Redis Cluster slot). Exactly once
holds across shards too: the writes are keyed by the event id, whatever shard brought
it. The unsharded stream, if it exists, is drained as one more shard, so raising the
shard count loses nothing still on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from control_plane.metrics import Metrics
from control_plane.outages import POSTGRES, POSTGRES_ERRORS, REDIS, Outages
from control_plane.partitions import Partitions
from control_plane.settings import Settings
from control_plane.usage_logs import Inserted, RowError, UsageRow, insert_rows, to_row
from shared.events import STREAM_FIELD, EventDecodeError, decode

log = logging.getLogger(__name__)

DEAD_LETTER_MAXLEN = 100_000
MAX_DELIVERIES = 5
CLAIM_EVERY_S = 30.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 5.0  # an outage's end is noticed within this

_DB_ERRORS = POSTGRES_ERRORS
# Errors that belong to a row rather than to Postgres being unavailable: bad data, a
# constraint, a trigger raising. Anything else (connections, shutdown, deadlocks, lack
# of resources) defers the whole batch and counts against no entry.
_ROW_ERRORS = (
    asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.exceptions.RaiseError,
)
_REDIS_ERRORS = (RedisError, OSError)


class IngestRetry(Exception):
    """A store failed mid-batch; nothing unsafe was acked and the batch will be re-read."""

    def __init__(self, store: str, cause: BaseException) -> None:
        super().__init__(f"{store} unavailable ({type(cause).__name__})")
        self.store = store


@dataclass(slots=True)
class BatchResult:
    read: int = 0
    inserted: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    debits: int = 0
    retrying: int = 0


Failure = tuple[bytes, bytes | None, str]  # entry id, raw event (if any), reason


@dataclass(slots=True)
class _Shard:
    """One shard of the stream, and where this consumer is in it."""

    stream: str
    dead: str
    # The unsharded stream read alongside shards: only if it exists, never created.
    leftover: bool = False
    group_ready: bool = False
    # Start by re-reading our own pending entries: a previous run may have stored
    # them without acking.
    backlog: bool = True
    next_claim: float = 0.0
    gone: bool = False  # a leftover stream that does not exist: nothing to read


@dataclass(slots=True)
class _Sorted:
    rows: list[UsageRow] = field(default_factory=list)
    row_ids: list[bytes] = field(default_factory=list)
    raws: list[bytes] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    gone: list[bytes] = field(default_factory=list)


class Consumer:
    """One member of the ingest consumer group. ``run`` is its long-lived task."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        metrics: Metrics,
        outages: Outages | None = None,
        rollups: bool = True,  # off only to measure what they cost (benchmarks.ingest)
        on_debited: Callable[[set[uuid.UUID]], None] | None = None,
    ) -> None:
        names = settings.names
        self._outages = Outages() if outages is None else outages
        self._shards = [_Shard(s.stream, s.dead) for s in names.event_shards(settings.event_shards)]
        if settings.event_shards > 1:
            self._shards.append(_Shard(names.events, names.events_dead, leftover=True))
        self._turn = 0  # the shard ``run_once`` reads next
        self._group = names.ingest_group
        self._consumer = settings.consumer_name
        self._count = settings.ingest_batch_size
        self._block_ms = settings.ingest_block_ms
        self._claim_idle_ms = settings.ingest_claim_idle_ms
        self._claim_every_s = min(CLAIM_EVERY_S, settings.ingest_claim_idle_ms / 2000)
        self._retention = timedelta(days=settings.retention_days)
        self._pool = pool
        self._rollups = rollups
        # Told, after each commit, which accounts the batch debited (the balance
        # watch of auto top-up and the low-balance e-mail); must not block.
        self._on_debited = on_debited
        self._redis = redis
        self._metrics = metrics
        self._partitions = Partitions()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask ``run`` to return once the batch in hand is finished."""
        self._stop.set()

    async def run(self) -> None:
        streams = ",".join(shard.stream for shard in self._shards)
        log.info("ingest started consumer=%s streams=%s", self._consumer, streams)
        if len(self._shards) == 1:
            await self._run_shard(self._shards[0])
        else:
            async with asyncio.TaskGroup() as shards:
                for shard in self._shards:
                    shards.create_task(self._run_shard(shard), name=f"ingest {shard.stream}")
        log.info("ingest stopped consumer=%s", self._consumer)

    async def _run_shard(self, shard: _Shard) -> None:
        delay = BACKOFF_FIRST_S
        while not self._stop.is_set() and not shard.gone:
            try:
                result = await self._run_batch(shard)
            except IngestRetry as e:
                # One line per outage (``outages``), not one per retry.
                self._outages.failed(e.store, e.__cause__ or e, "ingest")
            except Exception:  # top of the task: a bug must not end ingestion
                shard.backlog = True
                log.exception("ingest batch failed unexpectedly; retry in %.1fs", delay)
            else:
                self._outages.ok(REDIS)
                if result.inserted or result.duplicates:
                    self._outages.ok(POSTGRES)
                delay = BACKOFF_FIRST_S
                continue
            await self._sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def run_once(self, shard: int | None = None) -> BatchResult:
        """Read one batch from a shard (by index; default the next in turn), store it,
        ack it. Raises IngestRetry if a store failed."""
        if shard is None:
            shard, self._turn = self._turn, (self._turn + 1) % len(self._shards)
        return await self._run_batch(self._shards[shard])

    async def _run_batch(self, shard: _Shard) -> BatchResult:
        try:
            entries = await self._read(shard)
        except _REDIS_ERRORS as e:
            raise self._retry(shard, REDIS, e) from e
        if not entries:
            return BatchResult()
        self._metrics.batch_size.observe(len(entries))
        batch = self._sort(entries)
        try:
            stored, failed_rows = await self._store(batch.rows)
        except asyncpg.CheckViolationError as e:
            if e.constraint_name is None:  # no partition: retention dropped one we knew
                self._partitions.forget()
            raise self._retry(shard, POSTGRES, e) from e
        except _DB_ERRORS as e:
            raise self._retry(shard, POSTGRES, e) from e
        committed = time.time()
        failed_at = {i for i, _ in failed_rows}
        batch.failed += [(batch.row_ids[i], batch.raws[i], why) for i, why in failed_rows]
        result = BatchResult(read=len(entries), inserted=stored.rows, debits=stored.debits,
                             duplicates=len(batch.rows) - len(failed_at) - stored.rows)
        self._observe(batch, failed_at, result, committed)
        if self._on_debited is not None and stored.debits:
            self._on_debited({account for i, row in enumerate(batch.rows)
                              if i not in failed_at and (account := row.billed_account)})
        acks = [entry_id for i, entry_id in enumerate(batch.row_ids) if i not in failed_at]
        try:
            if acks:
                await self._redis.xack(shard.stream, self._group, *acks)
            # Stored and acked before anything is dead-lettered: a Redis failure from
            # here on re-delivers only entries that are harmless to see again.
            dead = await self._give_up(shard, batch.failed)
            await self._dead_letter(shard, dead, batch.gone)
        except _REDIS_ERRORS as e:
            raise self._retry(shard, REDIS, e) from e
        result.dead_lettered = len(dead)
        result.retrying = len(batch.failed) - len(dead)
        if result.retrying:
            shard.backlog = True  # re-read them from our pending list
        log.debug(
            "ingest batch read=%d inserted=%d duplicates=%d dead_lettered=%d retrying=%d",
            result.read, result.inserted, result.duplicates, result.dead_lettered,
            result.retrying,
        )
        return result

    def _observe(
        self, batch: _Sorted, failed_at: set[int], result: BatchResult, committed: float
    ) -> None:
        m = self._metrics
        m.events_ingested.inc(result.inserted)
        m.duplicates.inc(result.duplicates)
        m.debits.inc(result.debits)
        done = [row.done_at for i, row in enumerate(batch.rows) if i not in failed_at]
        if done:
            m.lag_seconds.observe(max(0.0, committed - min(done)))

    def _retry(self, shard: _Shard, store: str, cause: BaseException) -> IngestRetry:
        shard.backlog = True
        if store == REDIS:
            shard.group_ready = False  # Redis may have restarted empty: recreate it
        self._metrics.errors.labels(store).inc()
        return IngestRetry(store, cause)

    async def _read(self, shard: _Shard) -> list[tuple[bytes, dict[Any, Any] | None]]:
        if not shard.group_ready:
            if not await self._ensure_group(shard):
                return []
            shard.group_ready = True
        if not shard.backlog and time.monotonic() >= shard.next_claim:
            shard.next_claim = time.monotonic() + self._claim_every_s
            shard.backlog = await self._claim_stale(shard)
        if shard.backlog:
            # Id "0" returns this consumer's pending entries and never blocks.
            entries = await self._xreadgroup(shard, "0", block=None)
            if entries:
                return entries
            shard.backlog = False
        return await self._xreadgroup(shard, ">", block=self._block_ms)

    async def _ensure_group(self, shard: _Shard) -> bool:
        """Create the group on the shard if missing; False if there is nothing to read
        (a leftover unsharded stream that does not exist, which is never created)."""
        try:
            await self._redis.xgroup_create(shard.stream, self._group, id="0",
                                            mkstream=not shard.leftover)
        except ResponseError as e:
            if str(e).startswith("BUSYGROUP"):
                return True
            if shard.leftover and not await self._redis.exists(shard.stream):
                shard.gone = True
                return False
            raise
        return True

    async def _claim_stale(self, shard: _Shard) -> bool:
        """Take over entries pending too long with other consumers; True if any."""
        start: Any = "0-0"
        claimed = False
        for _ in range(10):
            # Not JUSTID: redis-py then drops the cursor. The claimed entries are read
            # again by the pending read that follows.
            reply = await self._redis.xautoclaim(
                shard.stream, self._group, self._consumer, self._claim_idle_ms,
                start_id=start, count=self._count,
            )
            start, entries = reply[0], reply[1]
            if entries:
                claimed = True
                log.info("ingest claimed stale entries count=%d stream=%s", len(entries),
                         shard.stream)
            if start in (b"0-0", "0-0"):
                break
        return claimed

    async def _xreadgroup(
        self, shard: _Shard, start: str, block: int | None
    ) -> list[tuple[bytes, dict[Any, Any] | None]]:
        reply = await self._redis.xreadgroup(
            self._group, self._consumer, {shard.stream: start}, count=self._count, block=block
        )
        if not reply:
            return []
        # redis-py types the reply loosely; a RESP2 XREADGROUP of one stream is
        # [[stream, [(id, fields), ...]]].
        entries: list[tuple[bytes, dict[Any, Any] | None]] = reply[0][1]  # type: ignore[index,assignment]
        return entries

    def _sort(self, entries: list[tuple[bytes, dict[Any, Any] | None]]) -> _Sorted:
        batch = _Sorted()
        now = datetime.now(UTC)
        oldest_kept = (now - self._retention).date() + timedelta(days=1)
        for entry_id, fields in entries:
            if not fields:
                batch.gone.append(entry_id)  # trimmed from the stream while pending
                continue
            raw = fields.get(STREAM_FIELD, fields.get(STREAM_FIELD.decode()))
            if raw is None:
                batch.failed.append((entry_id, None, "missing field e"))
                continue
            try:
                row = to_row(decode(raw), now)
            except (EventDecodeError, RowError) as e:
                batch.failed.append((entry_id, raw, str(e)))
                continue
            if row.day < oldest_kept:
                # Its partition is (or is about to be) dropped by retention.
                batch.failed.append((entry_id, raw, "older than the retention period"))
                continue
            batch.rows.append(row)
            batch.row_ids.append(entry_id)
            batch.raws.append(raw)
        return batch

    async def _give_up(self, shard: _Shard, failed: list[Failure]) -> list[Failure]:
        """The failed entries delivered ``MAX_DELIVERIES`` times: to be dead-lettered."""
        if not failed:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, _, _ in failed:
                pipe.xpending_range(shard.stream, self._group, min=entry_id, max=entry_id,
                                    count=1)
            replies = await pipe.execute()
        dead: list[Failure] = []
        for failure, reply in zip(failed, replies, strict=True):
            deliveries = int(reply[0]["times_delivered"]) if reply else MAX_DELIVERIES
            if deliveries >= MAX_DELIVERIES:
                dead.append(failure)
            else:
                log.info("ingest entry=%s failed (%s), delivery %d of %d", _id(failure[0]),
                         failure[2], deliveries, MAX_DELIVERIES)
        return dead

    async def _dead_letter(self, shard: _Shard, dead: list[Failure], gone: list[bytes]
                           ) -> None:
        if not dead and not gone:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            for entry_id, raw, reason in dead:
                fields: dict[Any, Any] = {"reason": reason, "entry_id": entry_id}
                if raw is not None:
                    fields[STREAM_FIELD] = raw
                pipe.xadd(shard.dead, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            pipe.xack(shard.stream, self._group, *[d[0] for d in dead], *gone)
            await pipe.execute()
        for entry_id, _, reason in dead:
            log.warning("ingest dead-lettered entry=%s reason=%s", _id(entry_id), reason)
        self._metrics.dead_lettered.inc(len(dead))
        if gone:
            log.error("ingest lost %d entries: trimmed from the stream before being stored",
                      len(gone))
            self._metrics.trimmed_unacked.inc(len(gone))

    async def _store(self, rows: list[UsageRow]) -> tuple[Inserted, list[tuple[int, str]]]:
        """Write the rows in one transaction; also the rows that failed on their own."""
        if not rows:
            return Inserted(), []
        async with self._pool.acquire() as conn:
            await self._partitions.ensure(conn, {row.day for row in rows})
            with self._metrics.insert_seconds.time():
                try:
                    async with conn.transaction():
                        return await insert_rows(conn, [row.values for row in rows],
                                                 self._rollups), []
                except _ROW_ERRORS as e:
                    if isinstance(e, asyncpg.CheckViolationError) and e.constraint_name is None:
                        raise  # a missing partition, not a bad row
                    log.warning("ingest batch refused (%s); storing row by row",
                                type(e).__name__)
                return await _store_each(conn, rows, self._rollups)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass


def _id(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


async def _store_each(
    conn: asyncpg.Connection, rows: list[UsageRow], rollups: bool
) -> tuple[Inserted, list[tuple[int, str]]]:
    """One transaction, one savepoint per row: good rows commit, bad ones are named."""
    inserted, debits = 0, 0
    failed: list[tuple[int, str]] = []
    async with conn.transaction():
        for i, row in enumerate(rows):
            try:
                async with conn.transaction():
                    one = await insert_rows(conn, [row.values], rollups)
            except _ROW_ERRORS as e:
                if isinstance(e, asyncpg.CheckViolationError) and e.constraint_name is None:
                    raise
                # The SQLSTATE class name, never the message: it could quote row data.
                failed.append((i, f"postgres refused the row ({type(e).__name__})"))
                continue
            inserted += one.rows
            debits += one.debits
    return Inserted(inserted, debits), failed
