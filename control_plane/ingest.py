"""The ingest consumer: metadata events from the Redis stream into ``usage_logs``.

Reads batches through the consumer group, writes each batch to Postgres in one
transaction that skips events already stored, and only then ``XACK``s; so an event is
stored exactly once however often it is delivered. Entries that cannot be decoded or
stored go to a dead-letter stream (and are acked) without holding up the rest. When
Postgres or Redis fails, the entries stay pending and are re-read after a back-off.
Logs entry ids and reasons, never entry contents. Never imports ``proxy``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from control_plane.metrics import Metrics
from control_plane.partitions import Partitions
from control_plane.settings import Settings
from control_plane.usage_logs import RowError, UsageRow, insert_rows, to_row
from shared.events import STREAM_FIELD, EventDecodeError, decode

log = logging.getLogger(__name__)

DEAD_LETTER_MAXLEN = 100_000
# Pending entries of a consumer that has been silent this long (a crashed replica, or
# this host before a restart under another pid) are claimed by a live one.
CLAIM_IDLE_MS = 60_000
CLAIM_EVERY_S = 30.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0

_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
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


@dataclass(slots=True)
class _Sorted:
    rows: list[UsageRow] = field(default_factory=list)
    row_ids: list[bytes] = field(default_factory=list)
    dead: list[tuple[bytes, bytes | None, str]] = field(default_factory=list)
    gone: list[bytes] = field(default_factory=list)


class Consumer:
    """One member of the ingest consumer group. ``run`` is its long-lived task."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        metrics: Metrics,
    ) -> None:
        names = settings.names
        self._stream = names.events
        self._dead_stream = names.events_dead
        self._group = names.ingest_group
        self._consumer = settings.consumer_name
        self._count = settings.ingest_batch_size
        self._block_ms = settings.ingest_block_ms
        self._pool = pool
        self._redis = redis
        self._metrics = metrics
        self._partitions = Partitions()
        self._stop = asyncio.Event()
        self._group_ready = False
        # Start by re-reading our own pending entries: a previous run may have stored
        # them without acking.
        self._backlog = True
        self._next_claim = 0.0

    def stop(self) -> None:
        """Ask ``run`` to return once the batch in hand is finished."""
        self._stop.set()

    async def run(self) -> None:
        delay = BACKOFF_FIRST_S
        log.info("ingest started consumer=%s stream=%s", self._consumer, self._stream)
        while not self._stop.is_set():
            try:
                await self.run_once()
            except IngestRetry as e:
                log.warning("ingest batch deferred: %s; retry in %.1fs", e, delay)
            except Exception:  # top of the task: a bug must not end ingestion
                self._backlog = True
                log.exception("ingest batch failed unexpectedly; retry in %.1fs", delay)
            else:
                delay = BACKOFF_FIRST_S
                continue
            await self._sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
        log.info("ingest stopped consumer=%s", self._consumer)

    async def run_once(self) -> BatchResult:
        """Read one batch, store it, ack it. Raises IngestRetry if a store failed."""
        try:
            entries = await self._read()
        except _REDIS_ERRORS as e:
            raise self._retry("redis", e) from e
        if not entries:
            return BatchResult()
        self._metrics.batch_size.observe(len(entries))
        batch = self._sort(entries)
        result = BatchResult(read=len(entries), dead_lettered=len(batch.dead))
        try:
            await self._dead_letter(batch)
        except _REDIS_ERRORS as e:
            raise self._retry("redis", e) from e
        try:
            result.inserted = await self._store(batch.rows)
        except asyncpg.CheckViolationError as e:
            # No partition for a row: one we remembered was dropped by retention.
            self._partitions.forget()
            raise self._retry("postgres", e) from e
        except _DB_ERRORS as e:
            raise self._retry("postgres", e) from e
        result.duplicates = len(batch.rows) - result.inserted
        self._metrics.events_ingested.inc(result.inserted)
        self._metrics.duplicates.inc(result.duplicates)
        if batch.row_ids:
            try:
                await self._redis.xack(self._stream, self._group, *batch.row_ids)
            except _REDIS_ERRORS as e:
                # Stored but not acked: re-delivery is harmless, the insert skips them.
                raise self._retry("redis", e) from e
        log.debug(
            "ingest batch read=%d inserted=%d duplicates=%d dead_lettered=%d",
            result.read, result.inserted, result.duplicates, result.dead_lettered,
        )
        return result

    def _retry(self, store: str, cause: BaseException) -> IngestRetry:
        self._backlog = True
        if store == "redis":
            self._group_ready = False  # Redis may have restarted empty: recreate it
        self._metrics.errors.labels(store).inc()
        return IngestRetry(store, cause)

    async def _read(self) -> list[tuple[bytes, dict[Any, Any] | None]]:
        if not self._group_ready:
            await self._ensure_group()
            self._group_ready = True
        if not self._backlog and time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + CLAIM_EVERY_S
            self._backlog = await self._claim_stale()
        if self._backlog:
            # Id "0" returns this consumer's pending entries and never blocks.
            entries = await self._xreadgroup("0", block=None)
            if entries:
                return entries
            self._backlog = False
        return await self._xreadgroup(">", block=self._block_ms)

    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except ResponseError as e:
            if not str(e).startswith("BUSYGROUP"):
                raise

    async def _claim_stale(self) -> bool:
        """Take over entries pending too long with other consumers; True if any."""
        start: Any = "0-0"
        claimed = False
        for _ in range(10):
            # Not JUSTID: redis-py then drops the cursor. The claimed entries are read
            # again by the pending read that follows.
            reply = await self._redis.xautoclaim(
                self._stream, self._group, self._consumer, CLAIM_IDLE_MS,
                start_id=start, count=self._count,
            )
            start, entries = reply[0], reply[1]
            if entries:
                claimed = True
                log.info("ingest claimed stale entries count=%d", len(entries))
            if start in (b"0-0", "0-0"):
                break
        return claimed

    async def _xreadgroup(
        self, start: str, block: int | None
    ) -> list[tuple[bytes, dict[Any, Any] | None]]:
        reply = await self._redis.xreadgroup(
            self._group, self._consumer, {self._stream: start}, count=self._count, block=block
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
        for entry_id, fields in entries:
            if not fields:
                batch.gone.append(entry_id)  # trimmed from the stream while pending
                continue
            raw = fields.get(STREAM_FIELD, fields.get(STREAM_FIELD.decode()))
            if raw is None:
                batch.dead.append((entry_id, None, "missing field e"))
                continue
            try:
                row = to_row(decode(raw), now)
            except (EventDecodeError, RowError) as e:
                batch.dead.append((entry_id, raw, str(e)))
                continue
            batch.rows.append(row)
            batch.row_ids.append(entry_id)
        return batch

    async def _dead_letter(self, batch: _Sorted) -> None:
        if not batch.dead and not batch.gone:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            for entry_id, raw, reason in batch.dead:
                fields: dict[Any, Any] = {"reason": reason, "entry_id": entry_id}
                if raw is not None:
                    fields[STREAM_FIELD] = raw
                pipe.xadd(
                    self._dead_stream, fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True
                )
            ids = [entry_id for entry_id, _, _ in batch.dead] + batch.gone
            pipe.xack(self._stream, self._group, *ids)
            await pipe.execute()
        for entry_id, _, reason in batch.dead:
            log.warning("ingest dead-lettered entry=%s reason=%s", _id(entry_id), reason)
        self._metrics.dead_lettered.inc(len(batch.dead))

    async def _store(self, rows: list[UsageRow]) -> int:
        if not rows:
            return 0
        async with self._pool.acquire() as conn:
            await self._partitions.ensure(conn, {row.day for row in rows})
            with self._metrics.insert_seconds.time():
                async with conn.transaction():
                    return await insert_rows(conn, [row.values for row in rows])

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass


def _id(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id
