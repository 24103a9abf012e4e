"""Closed-loop HTTP load: a fixed number of workers, each sending its next request as
soon as the previous one has finished, and the statistics of what they measured.

Owns: driving one target (a URL and its headers) for a bounded time *and* a bounded
request count, timing every request (total time, and time to the first body byte for
streams), counting errors by status or exception, and summarising samples
(percentiles, requests per second). Knows nothing about the proxy or how the servers
under test were started.

Must not import ``proxy``, ``control_plane`` or ``devstack``.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import aiohttp

_DONE = b"data: [DONE]\n\n"
# A request that takes longer than this is an error, so a stuck server cannot stall the
# benchmark past its duration by more than this.
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Target:
    name: str  # "direct" or "proxy"
    url: str  # the full chat-completions URL
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Load:
    concurrency: int
    duration: float  # seconds; no request is *started* after this
    max_requests: int  # and no more than this many are started
    body: bytes
    stream: bool


@dataclass
class Samples:
    """What one or more runs against one target measured. Latencies are in seconds."""

    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)  # streams only: first body byte
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0  # wall time from the first request to the last response

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        """Successful requests per second."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def extend(self, other: Samples) -> None:
        self.latencies += other.latencies
        self.ttfb += other.ttfb
        self.errors.update(other.errors)
        self.elapsed += other.elapsed

    def summary(self) -> dict[str, Any]:
        return {
            "requests_ok": self.ok,
            "errors": dict(self.errors),
            "elapsed_s": round(self.elapsed, 4),
            "rps": round(self.rps, 2),
            "latency_ms": distribution(self.latencies),
            "ttfb_ms": distribution(self.ttfb) if self.ttfb else None,
        }


def distribution(values: Sequence[float]) -> dict[str, float] | None:
    """Nearest-rank p50/p90/p99, mean and max of seconds ``values``, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] * 1000, 3)

    return {
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "mean": round(sum(ordered) / len(ordered) * 1000, 3),
        "max": round(ordered[-1] * 1000, 3),
    }


def new_session(max_connections: int) -> aiohttp.ClientSession:
    """One session for the whole benchmark: keep-alive connections to both targets."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


class _Budget:
    """Shared by a run's workers: whether another request may start."""

    def __init__(self, load: Load) -> None:
        self.deadline = perf_counter() + load.duration
        self.left = load.max_requests

    def take(self) -> bool:
        if self.left <= 0 or perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True


async def run(session: aiohttp.ClientSession, target: Target, load: Load) -> Samples:
    """Drive ``target`` with ``load.concurrency`` closed-loop workers; return the samples."""
    samples = Samples()
    budget = _Budget(load)
    start = perf_counter()
    workers = [_worker(session, target, load, budget, samples) for _ in range(load.concurrency)]
    await asyncio.gather(*workers)
    samples.elapsed = perf_counter() - start
    return samples


async def _worker(
    session: aiohttp.ClientSession, target: Target, load: Load, budget: _Budget, samples: Samples
) -> None:
    while budget.take():
        started = perf_counter()
        try:
            async with session.post(target.url, data=load.body, headers=target.headers) as resp:
                status = resp.status
                if load.stream:
                    first, complete = await _read_stream(resp)
                else:
                    await resp.read()
                    first, complete = None, True
        except (aiohttp.ClientError, TimeoutError) as exc:
            samples.errors[type(exc).__name__] += 1
            continue
        finished = perf_counter()
        if status != 200:
            samples.errors[f"HTTP {status}"] += 1
        elif not complete:
            samples.errors["truncated stream"] += 1
        else:
            samples.latencies.append(finished - started)
            if first is not None:
                samples.ttfb.append(first - started)


async def _read_stream(resp: aiohttp.ClientResponse) -> tuple[float | None, bool]:
    """Read an SSE body to its end: (when its first byte came, whether it ended in [DONE])."""
    first: float | None = None
    tail = b""
    async for chunk in resp.content.iter_any():
        if first is None:
            first = perf_counter()
        tail = (tail + chunk)[-len(_DONE) :]
    return first, tail == _DONE
