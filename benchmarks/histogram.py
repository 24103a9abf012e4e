"""What a benchmark measures, as data: a log-linear histogram of durations (HDR-style),
cheap to record into and to merge, and ``LoadResult``, one load-generator run's counts,
errors and histograms, whose JSON is the load generator's output. Pure data and no I/O,
so a report can read results without the load generator's event-loop machinery.

``Histogram`` counts durations in seconds from 1 µs to 300 s into fixed buckets whose
width is at most 1/128 of their lower bound, so any percentile it reports is within
0.4 % of the exact one (it answers with the bucket's midpoint, clamped to the exact min
and max). Both merge across processes and have a sparse JSON form.

Recording is a few integer operations and one list increment, so the load generator can
afford several records per request at tens of thousands of requests per second, and a
run's memory does not grow with its length.

Must not import ``proxy``, ``control_plane`` or anything outside the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Values are counted in integer units of 10 ns: 1 µs is then 100 units, already finer
# than 1 % where the range starts.
UNIT_S = 1e-8
_PER_SECOND = 1e8
# Each power of two is split into this many linear sub-buckets (HDR's "half count").
SUB_BUCKETS = 128
_SUB_BITS = 7
_EXACT = 2 * SUB_BUCKETS  # below this many units every unit has its own bucket
# 300 s is 3e10 units, 35 bits: the last power of two reaches 2**35 units ≈ 343 s.
_TOP_SHIFT = 35 - (_SUB_BITS + 1)
BUCKETS = (_TOP_SHIFT << _SUB_BITS) + _EXACT
# What the load generator measures: from the due time, from the send, streams' time to
# the first body bytes, between body reads, and to the end.
HISTOGRAMS = ("latency", "service", "ttft", "gap", "total")


def _index(seconds: float) -> int:
    units = int(seconds * _PER_SECOND)
    if units < _EXACT:
        return units if units > 0 else 0
    shift = units.bit_length() - (_SUB_BITS + 1)
    index = (shift << _SUB_BITS) + (units >> shift)
    return index if index < BUCKETS else BUCKETS - 1


def _bounds(index: int) -> tuple[float, float]:
    """The bucket's [low, high) in units."""
    if index < _EXACT:
        return float(index), float(index + 1)
    shift = (index >> _SUB_BITS) - 1
    mantissa = index - (shift << _SUB_BITS)
    return float(mantissa << shift), float((mantissa + 1) << shift)


class Histogram:
    """Counts of durations in seconds. Percentiles are nearest-rank, at bucket midpoints."""

    __slots__ = ("_counts", "_count", "_sum", "_min", "_max")

    def __init__(self) -> None:
        self._counts = [0] * BUCKETS
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = 0.0

    def record(self, seconds: float) -> None:
        self._counts[_index(seconds)] += 1
        self._count += 1
        self._sum += seconds
        if seconds < self._min:
            self._min = seconds
        if seconds > self._max:
            self._max = seconds

    def record_n(self, seconds: float, n: int) -> None:
        """``n`` observations of the same duration."""
        if n <= 0:
            return
        self._counts[_index(seconds)] += n
        self._count += n
        self._sum += seconds * n
        self._min = min(self._min, seconds)
        self._max = max(self._max, seconds)

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s observations to this histogram."""
        counts = self._counts
        for index, n in enumerate(other._counts):
            if n:
                counts[index] += n
        self._count += other._count
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    @property
    def count(self) -> int:
        return self._count

    # Statistics of an empty histogram are 0.0; summary_ms() reports them as None.

    def mean(self) -> float:
        return self._sum / self._count if self._count else 0.0

    def max(self) -> float:
        return self._max

    def min(self) -> float:
        return self._min if self._count else 0.0

    def _value(self, index: int) -> float:
        low, high = _bounds(index)
        middle = (low + high) / 2 * UNIT_S
        return min(max(middle, self._min), self._max)

    def percentile(self, q: float) -> float:
        """The nearest-rank ``q``-th percentile (0..100) in seconds."""
        if not self._count:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self._count))
        seen = 0
        for index, n in enumerate(self._counts):
            seen += n
            if n and seen >= rank:
                return self._value(index)
        return self._max

    def count_at_least(self, seconds: float) -> int:
        """How many observations fell in buckets at or above the one ``seconds`` is in."""
        return sum(self._counts[_index(seconds) :])

    def cdf(self, points: int = 200) -> list[tuple[float, float]]:
        """At most ``points`` (seconds, fraction of observations ≤ seconds) pairs, taken
        from the occupied buckets; they are log-spaced in value, so the tail is drawn as
        finely as the body. The last pair is always (max, 1.0)."""
        if not self._count:
            return []
        steps: list[tuple[float, float]] = []
        seen = 0
        for index, n in enumerate(self._counts):
            if n:
                seen += n
                high = _bounds(index)[1] * UNIT_S
                steps.append((min(high, self._max), seen / self._count))
        if len(steps) <= points:
            return steps
        last = len(steps) - 1
        keep = sorted({round(k * last / (points - 1)) for k in range(points)})
        return [steps[k] for k in keep]

    def summary_ms(self) -> dict[str, float | int | None]:
        """p50/p90/p99/p999/mean/max in milliseconds (None when empty), and the count."""
        if not self._count:
            return {"p50": None, "p90": None, "p99": None, "p999": None, "mean": None,
                    "max": None, "count": 0}

        def ms(seconds: float) -> float:
            return round(seconds * 1000, 3)

        return {
            "p50": ms(self.percentile(50)),
            "p90": ms(self.percentile(90)),
            "p99": ms(self.percentile(99)),
            "p999": ms(self.percentile(99.9)),
            "mean": ms(self.mean()),
            "max": ms(self._max),
            "count": self._count,
        }

    def to_json(self) -> dict[str, Any]:
        """Sparse: only occupied buckets, as [index, count] pairs."""
        return {
            "unit_s": UNIT_S,
            "sub_buckets": SUB_BUCKETS,
            "count": self._count,
            "sum": self._sum,
            "min": self.min(),
            "max": self._max,
            "buckets": [[i, n] for i, n in enumerate(self._counts) if n],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        if data.get("unit_s") != UNIT_S or data.get("sub_buckets") != SUB_BUCKETS:
            raise ValueError("histogram JSON has a different bucket layout")
        histogram = cls()
        for index, n in data["buckets"]:
            histogram._counts[int(index)] += int(n)
        histogram._count = int(data["count"])
        if sum(histogram._counts) != histogram._count:
            raise ValueError("histogram JSON: bucket counts do not add up to its count")
        histogram._sum = float(data["sum"])
        if histogram._count:
            histogram._min = float(data["min"])
            histogram._max = float(data["max"])
        return histogram

    def __repr__(self) -> str:
        return f"Histogram(count={self._count}, p50={self.percentile(50):.6f}s)"


@dataclass
class LoadResult:
    """One run's outcome (``benchmarks.loadgen`` fills it); ``to_json`` is its output."""

    mode: str
    concurrency: int | None
    rate: float | None
    processes: int
    duration_s: float
    elapsed_s: float = 0.0  # from the end of the warmup to the last measured outcome
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(
        default_factory=lambda: {name: Histogram() for name in HISTOGRAMS})

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def merge(self, other: LoadResult) -> None:
        """Add another process's share of the same run (started at the same time)."""
        if self.concurrency is not None and other.concurrency is not None:
            self.concurrency += other.concurrency
        if self.rate is not None and other.rate is not None:
            self.rate += other.rate
        self.processes += other.processes
        self.duration_s = max(self.duration_s, other.duration_s)
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.sent += other.sent
        self.ok += other.ok
        for kind, n in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + n
        for name, histogram in other.histograms.items():
            self.histograms.setdefault(name, Histogram()).merge(histogram)

    def to_json(self) -> dict[str, Any]:
        elapsed = round(self.elapsed_s, 6)  # rps from the figure written, so it re-reads
        return {
            "mode": self.mode, "concurrency": self.concurrency, "rate": self.rate,
            "processes": self.processes, "duration_s": self.duration_s,
            "elapsed_s": elapsed, "sent": self.sent, "ok": self.ok,
            "rps": round(self.ok / elapsed, 2) if elapsed > 0 else 0.0,
            "errors": dict(sorted(self.errors.items())),
            "histograms": {name: h.to_json() for name, h in self.histograms.items()},
            "summary": {name: h.summary_ms() for name, h in self.histograms.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadResult:
        plain = {k: data[k] for k in ("mode", "concurrency", "rate", "processes",
                                      "duration_s", "elapsed_s", "sent", "ok", "errors")}
        histograms = {k: Histogram.from_json(v) for k, v in data["histograms"].items()}
        return cls(**plain, histograms=histograms)
