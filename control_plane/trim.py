"""Trimming the event stream without ever losing an entry ingest has not stored.

``trim`` removes entries below the lowest id any consumer group may still need: the
oldest entry pending (delivered, not acked) in each group, or, if none is pending, the
entry after the group's last-delivered id. It is ``XTRIM MINID``, never a blind
``MAXLEN``. The producers' approximate ``MAXLEN`` cap is what bounds memory when no one
consumes for long; if that cap ever removes entries a group had not read yet, the
group's lag (entries added but not read) exceeds what is left after its position, and
this says how many with a log line and the ``qnp_stream_trimmed_unacked`` metric.
(Pending entries cut the same way are counted by ingest when it finds them empty.)
Also reports stream length and pending count. A sharded stream is trimmed shard by
shard, each against its own groups' positions (ids of different shards are unrelated);
the gauges are the sums over shards. Never imports ``proxy``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from control_plane.metrics import Metrics

log = logging.getLogger(__name__)

StreamId = tuple[int, int]


def parse_id(raw: bytes | str | None) -> StreamId:
    if raw is None:
        return (0, 0)
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return (int(ms), int(seq or 0))


def _fmt(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


@dataclass(frozen=True, slots=True)
class TrimResult:
    length: int = 0
    pending: int = 0
    trimmed: int = 0
    floor: str | None = None
    lost: bool = False


class Trimmer:
    """Remembers the losses it reported, so each lost entry is counted once."""

    def __init__(
        self, redis: aioredis.Redis, stream: str | Sequence[str], metrics: Metrics
    ) -> None:
        self._redis = redis
        self._streams = (stream,) if isinstance(stream, str) else tuple(stream)
        self._metrics = metrics
        self._reported: dict[tuple[str, str], int] = {}

    async def trim(self) -> TrimResult:
        """Trim every shard; the totals (``floor`` is the first shard's, for logs)."""
        results = [await self._trim(stream) for stream in self._streams]
        length = sum(r.length for r in results)
        pending = sum(r.pending for r in results)
        self._metrics.stream_length.set(length)
        self._metrics.pending.set(pending)
        return TrimResult(length, pending, sum(r.trimmed for r in results),
                          results[0].floor, any(r.lost for r in results))

    async def _trim(self, stream: str) -> TrimResult:
        try:
            groups: list[dict[str, Any]] = await self._redis.xinfo_groups(stream)
        except ResponseError:
            return TrimResult()  # no stream yet
        if not groups:
            return TrimResult(length=int(await self._redis.xlen(stream)))
        floor: StreamId | None = None
        pending = 0
        for group in groups:
            last = parse_id(group["last-delivered-id"])
            need = (last[0], last[1] + 1)
            count = int(group["pending"])
            pending += count
            if count:
                summary = await self._redis.xpending(stream, group["name"])
                need = min(need, parse_id(summary["min"]))
            floor = need if floor is None else min(floor, need)
        assert floor is not None
        before = int(await self._redis.xlen(stream))
        # Exact, not "~": an approximate MINID could leave whole nodes, never take more,
        # but exact keeps the stream's length a true count of what is still needed.
        trimmed = int(await self._redis.xtrim(stream, minid=_fmt(floor), approximate=False))
        lost = await self._check_lost(stream, groups)
        self._metrics.trimmed.inc(trimmed)
        return TrimResult(before - trimmed, pending, trimmed, _fmt(floor), lost)

    async def _check_lost(self, stream: str, groups: list[dict[str, Any]]) -> bool:
        """True if entries a group never read were trimmed since the last check."""
        length = int(await self._redis.xlen(stream))
        head = await self._redis.xrange(stream, count=1)
        first = parse_id(head[0][0]) if head else None
        found = False
        for group in groups:
            name = str(group["name"])
            lag = group.get("lag")
            last = parse_id(group["last-delivered-id"])
            if lag is None or (first is not None and first <= last):
                lost = 0  # lag unknown, or the head is still behind the group: no gap
            else:
                lost = max(0, int(lag) - length)
            new = lost - self._reported.get((stream, name), 0)
            self._reported[(stream, name)] = lost
            if new > 0:
                found = True
                log.error(
                    "event stream lost %d entries group=%s had not read: the MAXLEN cap "
                    "was reached while ingest was behind stream=%s", new, name, stream,
                )
                self._metrics.trimmed_unacked.inc(new)
        return found
