"""CPU time and resident memory of the processes under test, read from outside.

Owns: reading a process tree (root pids and all their descendants, e.g. a proxy's
supervisor and its workers) with psutil, and a ``Watch`` that samples named trees while
a measurement runs and sums up what each used (CPU seconds, RSS before / peak / end,
and the RSS time series for the soak's plot).

Must not import ``proxy`` or ``control_plane``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil


@dataclass(frozen=True, slots=True)
class Reading:
    at: float  # time.monotonic()
    cpu_s: float  # user + system seconds of every live process in the tree
    rss: int  # bytes, summed over the tree


def tree(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes of the trees rooted at ``pids``, found once: listing children scans
    all of /proc (milliseconds), reading a known process is microseconds, and sampling
    must not disturb the load generator it shares a CPU with."""
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return procs


def read(procs: Iterable[psutil.Process]) -> Reading:
    cpu, rss = 0.0, 0
    for proc in procs:
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                cpu += times.user + times.system
                rss += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # exited: nothing left to count
    return Reading(time.monotonic(), cpu, rss)


def cpu_busy(before: list[Any], after: list[Any]) -> list[float]:
    """Per CPU, the share of the interval it was not idle (from ``psutil.cpu_times``)."""
    shares = []
    for b, a in zip(before, after, strict=True):
        total = sum(a) - sum(b)
        idle = (a.idle + getattr(a, "iowait", 0)) - (b.idle + getattr(b, "iowait", 0))
        shares.append(round(1 - idle / total, 3) if total > 0 else 0.0)
    return shares


@dataclass
class Track:
    """One tree's readings over one measurement."""

    readings: list[Reading] = field(default_factory=list)

    @property
    def cpu_s(self) -> float:
        if len(self.readings) < 2:
            return 0.0
        return self.readings[-1].cpu_s - self.readings[0].cpu_s

    @property
    def rss_before(self) -> int:
        return self.readings[0].rss if self.readings else 0

    @property
    def rss_peak(self) -> int:
        return max((r.rss for r in self.readings), default=0)

    def summary(self) -> dict[str, Any]:
        end = self.readings[-1].rss if self.readings else 0
        return {
            "cpu_s": round(self.cpu_s, 4),
            "rss_before_mb": round(self.rss_before / 2**20, 2),
            "rss_peak_mb": round(self.rss_peak / 2**20, 2),
            "rss_end_mb": round(end / 2**20, 2),
            "samples": len(self.readings),
        }

    def series(self) -> list[tuple[float, float]]:
        """(seconds since the first reading, RSS in MiB)."""
        if not self.readings:
            return []
        t0 = self.readings[0].at
        return [(round(r.at - t0, 2), round(r.rss / 2**20, 3)) for r in self.readings]


class Watch:
    """Named groups of process trees, read together at each ``sample()``, and how busy
    each CPU was between the first and the last sample."""

    def __init__(self, groups: Mapping[str, tuple[int, ...]]) -> None:
        self._procs = {name: tree(pids) for name, pids in groups.items() if pids}
        self.tracks = {name: Track() for name in self._procs}
        self._cpus_first: list[Any] = []
        self._cpus_last: list[Any] = []

    def sample(self) -> None:
        for name, procs in self._procs.items():
            self.tracks[name].readings.append(read(procs))
        self._cpus_last = psutil.cpu_times(percpu=True)
        if not self._cpus_first:
            self._cpus_first = self._cpus_last

    def cpu_busy(self) -> list[float]:
        return cpu_busy(self._cpus_first, self._cpus_last)
