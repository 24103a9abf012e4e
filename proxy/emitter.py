"""The event emitter: one metadata event per request, to the Redis stream, in batches.

``emit()`` never awaits and never fails: it appends to a bounded in-memory buffer (a
full buffer drops the event, counts it and logs). A single background task encodes the
buffered events and sends them as pipelined ``XADD``s, every ``flush_interval`` or
as soon as a batch fills. When Redis refuses, the batch stays at the head of the
buffer and is retried with backoff, oldest first. ``close()`` flushes what is left.
Delivery to the stream is at-least-once (a batch whose reply was lost is sent again);
ingest stores each event id exactly once.

Must not import the request handlers, auth or the upstream client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.events import STREAM_FIELD, Event

log = logging.getLogger("qnp.proxy.emitter")

_DROP_LOG_EVERY = 10.0  # seconds between "dropping events" log lines


def _ignore(_n: int) -> None:
    return None


class EventEmitter:
    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        *,
        max_buffer: int,
        batch_size: int,
        flush_interval: float,
        on_sent: Callable[[int], None] = _ignore,
        on_dropped: Callable[[int], None] = _ignore,
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._max = max_buffer
        self._batch = batch_size
        self._interval = flush_interval
        self._buffer: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._on_sent = on_sent
        self._on_dropped = on_dropped
        self._last_drop_log = 0.0
        self._dropped_since_log = 0
        self._stopping = False

    def __len__(self) -> int:
        return len(self._buffer)

    def emit(self, event: Event) -> None:
        if len(self._buffer) >= self._max:
            self._drop()
            return
        self._buffer.append(event)
        if len(self._buffer) >= self._batch:
            self._wake.set()

    def _drop(self) -> None:
        self._on_dropped(1)
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_EVERY:
            log.error("event buffer full: dropped %d events", self._dropped_since_log)
            self._last_drop_log = now
            self._dropped_since_log = 0

    async def _send(self) -> int:
        """Send up to one batch from the head of the buffer; the count sent."""
        n = min(len(self._buffer), self._batch)
        if n == 0:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for i in range(n):
            pipe.xadd(self._stream, {STREAM_FIELD: self._buffer[i].encode()})
        await pipe.execute()
        # Only now are they Redis's: take them off the buffer.
        for _ in range(n):
            self._buffer.popleft()
        self._on_sent(n)
        return n

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
                while await self._send() == self._batch and not self._stopping:
                    pass
                backoff = self._interval
            except (RedisError, OSError) as e:
                log.warning(
                    "cannot send events (%s); %d buffered, retrying",
                    type(e).__name__, len(self._buffer),
                )
                if not self._stopping:
                    await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    def stop(self) -> None:
        """Ask ``run`` to return once the batch in flight (if any) is sent."""
        self._stopping = True
        self._wake.set()

    async def close(self, deadline: float) -> None:
        """Flush what is buffered, giving up after ``deadline`` seconds.

        Call after ``run`` has returned: a batch cancelled mid-``XADD`` could already be
        in Redis, and sending it again would duplicate it.
        """
        try:
            async with asyncio.timeout(deadline):
                while self._buffer:
                    try:
                        await self._send()
                    except (RedisError, OSError):
                        await asyncio.sleep(0.1)
        except TimeoutError:
            pass
        if self._buffer:
            log.error("shutting down with %d unsent events", len(self._buffer))
            self._on_dropped(len(self._buffer))
