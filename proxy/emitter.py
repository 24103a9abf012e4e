"""The event emitter: one metadata event per request, to the Redis stream, in batches.

``emit()`` never awaits and never fails: it appends to a bounded in-memory buffer (a
full buffer drops the event, counts it and logs). A background task (``run``) sends the
buffer as pipelined ``XADD``s every ``flush_interval``, or as soon as a batch fills.

When Redis is unreachable or refuses writes (down, out of memory, read-only during a
failover), a circuit breaker opens: from then on batches go to the local spool
(``proxy.spool``) instead of waiting in memory. A second task (``replay``) probes Redis
with backoff; once a write succeeds it closes the breaker and drains the spool oldest
first, alongside new events that again go straight to Redis. Without a spool (it could
not be opened) batches wait at the head of the buffer and are retried.

Sharded streams (``QNP_EVENT_SHARDS``): the emitter is given every shard's stream and
sends each batch to the next one in turn, one pipeline to one key (so to one Redis
Cluster node). A batch that failed is sent again to the same shard; only a batch that
went through the spool may land on another one, which ingest's idempotent writes make
harmless.

Delivery to the stream is at-least-once (a batch whose reply was lost, or a replayed
chunk cut short, is sent again); ingest stores each event id exactly once.

What a crash can lose: SIGTERM loses nothing (``close`` sends what is buffered, or
spools it). SIGKILL loses the events still in memory: the batch being sent (it leaves
the buffer only once Redis confirms it) and those that ended since, i.e. about one
``flush_interval`` of traffic and at most 2 × ``batch_size`` events while Redis or the
spool keeps up (the whole bounded buffer only if neither can). Spooled events survive
SIGKILL; a crash of the machine loses at most the last un-fsynced spool write, one
batch (``batch_size`` events).

Must not import the request handlers, auth or the upstream client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy import resp
from proxy.spool import Spool
from shared.events import STREAM_FIELD, Event

log = logging.getLogger("qnp.proxy.emitter")

_DROP_LOG_EVERY = 10.0  # seconds between "dropping events" log lines
_PROBE_FIRST = 0.1
_PROBE_MAX = 2.0
# Redis failures that open the breaker: refused connections, timeouts, and error
# replies such as OOM, READONLY, MASTERDOWN, LOADING (redis-py raises them as RedisError).
_SEND_ERRORS = (RedisError, OSError, TimeoutError)


def _ignore(_n: int) -> None:
    return None


class EventEmitter:
    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str | Sequence[str],
        *,
        max_buffer: int,
        batch_size: int,
        flush_interval: float,
        spool: Spool | None = None,
        stream_max_len: int = 0,
        send_timeout: float = 2.0,
        on_sent: Callable[[int], None] = _ignore,
        on_dropped: Callable[[int], None] = _ignore,
        on_spooled: Callable[[int], None] = _ignore,
        on_replayed: Callable[[int], None] = _ignore,
    ) -> None:
        self._redis = redis
        self._pipe = resp.Pipe.of(redis)
        self._streams = (stream,) if isinstance(stream, str) else tuple(stream)
        if not self._streams:
            raise ValueError("no event stream to write to")
        # Every XADD is its shard's head, then the payload: packed once per shard.
        trim: tuple[resp.Arg, ...] = ("MAXLEN", "~", stream_max_len) if stream_max_len else ()
        self._xadd_heads = tuple(
            resp.header(5 + len(trim)) + b"".join(
                resp.bulk(a) for a in ("XADD", name, *trim, "*", STREAM_FIELD))
            for name in self._streams
        )
        self._shard = 0  # the shard the next batch goes to; moves on once one is sent
        self._max = max_buffer
        self._batch = batch_size
        self._interval = flush_interval
        self._spool = spool
        self._max_len = stream_max_len
        self._send_timeout = send_timeout
        self._buffer: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._spool_wake = asyncio.Event()
        self._on_sent = on_sent
        self._on_dropped = on_dropped
        self._on_spooled = on_spooled
        self._on_replayed = on_replayed
        self._last_drop_log = 0.0
        self._dropped_since_log = 0
        self._stopping = False
        self.healthy = True  # the breaker: False while Redis refuses writes

    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def spooled(self) -> int:
        """Events waiting in the spool."""
        return 0 if self._spool is None else len(self._spool)

    def emit(self, event: Event) -> None:
        if len(self._buffer) >= self._max:
            self._drop(1, "event buffer full")
            return
        self._buffer.append(event)
        if len(self._buffer) >= self._batch:
            self._wake.set()

    def _drop(self, n: int, why: str) -> None:
        self._on_dropped(n)
        self._dropped_since_log += n
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_EVERY:
            log.error("%s: dropped %d events", why, self._dropped_since_log)
            self._last_drop_log = now
            self._dropped_since_log = 0

    def _trip(self, error: BaseException) -> None:
        if self.healthy:
            log.warning(
                "redis refuses events (%s); spooling to disk, %d buffered",
                type(error).__name__, len(self._buffer),
            )
        self.healthy = False
        self._spool_wake.set()

    async def _xadd(self, payloads: list[bytes]) -> None:
        """One batch to the current shard; the next batch goes to the next shard only
        once this one is in (a failed batch is retried where it was sent)."""
        shard = self._shard
        if self._pipe is not None:
            head = self._xadd_heads[shard]
            async with asyncio.timeout(self._send_timeout):
                await self._pipe.call_many([head + resp.bulk(p) for p in payloads])
        else:
            stream = self._streams[shard]
            pipe = self._redis.pipeline(transaction=False)
            for payload in payloads:
                if self._max_len:
                    pipe.xadd(stream, {STREAM_FIELD: payload},
                              maxlen=self._max_len, approximate=True)
                else:
                    pipe.xadd(stream, {STREAM_FIELD: payload})
            async with asyncio.timeout(self._send_timeout):
                await pipe.execute()
        self._shard = (shard + 1) % len(self._streams)

    async def _send(self) -> int:
        """Send up to one batch from the head of the buffer; the count sent."""
        n = min(len(self._buffer), self._batch)
        if n == 0:
            return 0
        await self._xadd([self._buffer[i].encode() for i in range(n)])
        # Only now are they Redis's: take them off the buffer.
        for _ in range(n):
            self._buffer.popleft()
        self._on_sent(n)
        return n

    async def _spool_batch(self) -> int:
        """Move up to one batch from the buffer to the spool; the count moved."""
        assert self._spool is not None
        n = min(len(self._buffer), self._batch)
        if n == 0:
            return 0
        payloads = [self._buffer[i].encode() for i in range(n)]
        taken = await asyncio.to_thread(self._spool.append, payloads)
        for _ in range(n):
            self._buffer.popleft()
        if taken:
            self._on_spooled(taken)
        if taken < n:
            self._drop(n - taken, "event spool full")
        self._spool_wake.set()
        return n

    async def _flush_once(self) -> int:
        """Hand one batch to Redis, or to the spool while the breaker is open."""
        if self.healthy or self._spool is None:
            try:
                return await self._send()
            except _SEND_ERRORS as e:
                self._trip(e)
                if self._spool is None:
                    raise
        return await self._spool_batch()

    async def run(self) -> None:
        """The batching loop; returns after ``stop()``, never in the middle of a send."""
        backoff = self._interval
        while not self._stopping:
            if len(self._buffer) < self._batch:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._interval)
                except TimeoutError:
                    pass
            self._wake.clear()
            try:
                while await self._flush_once() == self._batch and not self._stopping:
                    pass
                backoff = self._interval
            except _SEND_ERRORS as e:  # no spool: the batch stays at the head, retried
                log.warning(
                    "cannot send events (%s); %d buffered, retrying",
                    type(e).__name__, len(self._buffer),
                )
                if not self._stopping:
                    await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def replay(self) -> None:
        """Probe Redis while the breaker is open; drain the spool, oldest first."""
        if self._spool is None:
            return
        delay = _PROBE_FIRST
        while not self._stopping:
            if self.healthy and not len(self._spool):
                self._spool_wake.clear()
                await self._pause(self._spool_wake, 1.0)
                continue
            try:
                if len(self._spool):
                    await self._replay_chunk()
                else:
                    async with asyncio.timeout(self._send_timeout):
                        await self._redis.ping()
            except _SEND_ERRORS as e:
                self._trip(e)
                await self._pause(asyncio.Event(), delay)
                delay = min(delay * 2, _PROBE_MAX)
                continue
            if not self.healthy:
                log.warning("redis takes events again; replaying %d spooled", len(self._spool))
                self.healthy = True
            delay = _PROBE_FIRST

    async def _replay_chunk(self) -> None:
        assert self._spool is not None
        chunk = await asyncio.to_thread(self._spool.read, self._batch)
        if chunk is None:
            return
        if chunk.records:
            await self._xadd(chunk.records)
        await asyncio.to_thread(self._spool.consume, chunk)
        self._on_replayed(len(chunk.records))
        if not len(self._spool):
            log.info("event spool drained")

    async def _pause(self, wake: asyncio.Event, seconds: float) -> None:
        try:
            await asyncio.wait_for(wake.wait(), seconds)
        except TimeoutError:
            pass

    def stop(self) -> None:
        """Ask ``run`` and ``replay`` to return once the batch in flight (if any) is done."""
        self._stopping = True
        self._wake.set()
        self._spool_wake.set()

    async def close(self, deadline: float) -> None:
        """Send what is buffered (or spool it), giving up on Redis after ``deadline`` s.

        Call after ``run`` and ``replay`` have returned: a batch cancelled mid-``XADD``
        could already be in Redis, and sending it again would duplicate it. What is
        left in the spool stays on disk for the next process on this node to replay.
        """
        try:
            async with asyncio.timeout(deadline):
                while self._buffer:
                    try:
                        await self._flush_once()
                    except _SEND_ERRORS:
                        await asyncio.sleep(0.1)
        except TimeoutError:
            pass
        while self._buffer and self._spool is not None:
            try:
                await self._spool_batch()
            except OSError as e:
                log.error("cannot spool events at shutdown (%s)", type(e).__name__)
                break
        if self._buffer:
            log.error("shutting down with %d unsent events", len(self._buffer))
            self._on_dropped(len(self._buffer))
            self._buffer.clear()
        if self._spool is not None:
            if len(self._spool):
                log.warning("%d events stay spooled for the next start", len(self._spool))
            await asyncio.to_thread(self._spool.close)
