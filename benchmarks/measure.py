"""One measurement: the load generator against one target, with the target's and the
load side's CPU and memory sampled while it runs, and the events our proxy emitted.

Owns: writing request bodies, running ``python -m benchmarks.loadgen`` as a pinned
subprocess (stopped by its pid on every exit path), sampling process trees during the
run, counting the load generator's own CPU (``RUSAGE_CHILDREN``: it is our only child
that exits during a run), waiting for the proxy's last event batch, and merging the
rounds of one scenario against one target into a ``Measured``. Also the progress line.

Must not import ``proxy`` or ``control_plane``.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks.histogram import Histogram
from benchmarks.procstat import Track, Watch
from benchmarks.stack import Child, Stack, Target, cpu_list

HISTOGRAMS = ("latency", "service", "ttft", "gap", "total")
_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say hello to the benchmark in a few words."},
]
_MODEL_PART = re.compile(r"-(ttft|chunks|delay|tpc)(\d+(?:\.\d+)?)")
_EVENTS_SETTLE = 3.0  # the proxy flushes events every 20 ms; this is ample
_POLL = 0.1  # how often we look whether the load generator is done
_RUN_OVERHEAD = 0.9  # seconds a run takes beyond its load: start-up, settling


def model_shape(model: str, default_chunks: int = 20) -> tuple[float, int, float]:
    """(ttft s, chunks, delay s) of a mock model name, e.g. ``mock-ttft200-chunks50-delay20``."""
    parts = {k: float(v) for k, v in _MODEL_PART.findall(model)}
    return parts.get("ttft", 0) / 1000, int(parts.get("chunks", default_chunks)), \
        parts.get("delay", 0) / 1000


def stream_lifetime(model: str) -> float:
    ttft, chunks, delay = model_shape(model)
    return ttft + max(chunks - 1, 0) * delay


@dataclass(frozen=True, slots=True)
class Load:
    """What one load-generator run sends: closed loop (concurrency) or open loop (rate)."""

    model: str
    stream: bool
    duration: float
    concurrency: int | None = None
    rate: float | None = None
    connections: int | None = None  # open loop: most connections (default: loadgen's)

    def estimate(self) -> float:
        """Seconds one run takes, for the ETA."""
        tail = stream_lifetime(self.model) if self.stream else 0.0
        return self.duration + tail + _RUN_OVERHEAD


def body(model: str, stream: bool) -> bytes:
    payload: dict[str, Any] = {"model": model, "messages": _MESSAGES, "max_tokens": 64}
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return orjson.dumps(payload)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


class Progress:
    """One line on stderr (rewritten in place on a terminal): what runs, elapsed, ETA."""

    def __init__(self, planned_s: float) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self.planned, self.done = planned_s, 0.0

    def show(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        if self.done > 0:  # scale what is left by how far off the estimates were so far
            left = max(self.planned - self.done, 0.0) * elapsed / self.done
        else:
            left = max(self.planned - elapsed, 0.0)
        line = f"[{_clock(elapsed)} elapsed, ~{_clock(left)} left] {text}"
        sys.stderr.write(f"\r\x1b[K{line}" if self.tty else line + "\n")
        sys.stderr.flush()

    def advance(self, estimate_s: float) -> None:
        self.done += estimate_s

    def skip(self, estimate_s: float) -> None:
        """Planned work that will not run (a sweep that stopped early)."""
        self.planned -= estimate_s

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


@dataclass
class Run:
    """One load-generator run against one target."""

    target: str
    result: dict[str, Any]  # the load generator's JSON
    target_track: Track | None
    load_track: Track | None
    loadgen_cpu_s: float
    events: int | None  # events our proxy added during the run; None for other targets
    argv: list[str]
    cpu_busy: list[float]  # per CPU of the machine, share of the run it was busy

    @property
    def sent(self) -> int:
        return int(self.result["sent"])

    @property
    def ok(self) -> int:
        return int(self.result["ok"])


class Runner:
    """Runs the load generator; knows the stack, the pinning and where files go."""

    def __init__(self, stack: Stack, workdir: Path, progress: Progress, *,
                 loadgen_processes: int, timeout: float, sample_every: float) -> None:
        self.stack, self.workdir, self.progress = stack, workdir, progress
        self.loadgen_processes, self.timeout = loadgen_processes, timeout
        self.sample_every = sample_every
        self.count = 0
        self.requests: Counter[str] = Counter()  # per target: every request sent
        self.events: Counter[str] = Counter()  # per proxy target: events it emitted

    def _body_file(self, model: str, stream: bool) -> Path:
        path = self.workdir / f"body-{model}-{'stream' if stream else 'plain'}.json"
        if not path.exists():
            path.write_bytes(body(model, stream))
        return path

    def argv(self, target: Target, load: Load, output: Path) -> list[str]:
        argv = [sys.executable, "-m", "benchmarks.loadgen", "--url",
                f"{target.base_url}/chat/completions",
                "--body-file", str(self._body_file(load.model, load.stream))]
        for name, value in target.headers.items():
            argv += ["--header", f"{name}: {value}"]
        if target.ca is not None:
            argv += ["--ca", target.ca]
        if load.rate is not None:
            argv += ["--rate", f"{load.rate:g}"]
            if load.connections:
                argv += ["--connections", str(load.connections)]
        else:
            argv += ["--concurrency", str(load.concurrency)]
        argv += ["--duration", f"{load.duration:g}", "--warmup", "0",
                 "--processes", str(self.loadgen_processes), "--timeout", f"{self.timeout:g}",
                 "--output", str(output)]
        if load.stream:
            # In-flight streams may finish after the duration: a whole lifetime and then some.
            argv += ["--stream", "--grace", f"{stream_lifetime(load.model) + 5:g}"]
        if self.stack.pinning.load is not None:
            argv += ["--cpus", cpu_list(self.stack.pinning.load)]
        return argv

    def run(self, target: Target, load: Load, label: str, *,
            sample_every: float | None = None) -> Run:
        self.progress.show(label)
        self.count += 1
        output = self.workdir / f"load-{self.count:04d}.json"
        argv = self.argv(target, load, output)
        watch = Watch({"target": target.pids, "load": self.stack.load_pids})
        events_before = self.stack.events_added() if target.is_ours else 0
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        watch.sample()
        loadgen = Child(f"loadgen-{self.count}", argv, self.stack.env,
                        self.workdir / "loadgen.log", self.stack.pinning.load)
        try:
            interval = sample_every or self.sample_every
            next_sample = next_show = time.monotonic()
            while loadgen.proc.poll() is None:
                time.sleep(min(interval, _POLL))
                now = time.monotonic()
                if now >= next_sample + interval:
                    watch.sample()
                    next_sample = now
                if now >= next_show + 1.0:  # keep the elapsed/ETA clock moving
                    self.progress.show(label)
                    next_show = now
            watch.sample()
        finally:
            loadgen.stop()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if loadgen.proc.returncode != 0 or not output.exists():
            raise RuntimeError(f"load generator failed ({loadgen.proc.returncode}): "
                               f"{' '.join(argv)}\n{loadgen.tail()}")
        result = orjson.loads(output.read_bytes())
        events = None
        if target.is_ours:
            events = self._events_since(events_before, int(result["sent"]))
            self.events[target.name] += events
        self.requests[target.name] += int(result["sent"])
        self.progress.advance(load.estimate())
        return Run(target.name, result, watch.tracks.get("target"), watch.tracks.get("load"),
                   (usage.ru_utime + usage.ru_stime)
                   - (usage_before.ru_utime + usage_before.ru_stime), events, argv,
                   watch.cpu_busy())

    def _events_since(self, before: int, expected: int) -> int:
        """Events added since ``before``, once the proxy's last batch has landed."""
        deadline = time.monotonic() + _EVENTS_SETTLE
        added = self.stack.events_added() - before
        while added < expected and time.monotonic() < deadline:
            time.sleep(0.02)
            added = self.stack.events_added() - before
        return added


@dataclass
class Measured:
    """One scenario against one target: every round merged."""

    runs: list[Run] = field(default_factory=list)

    def add(self, run: Run) -> None:
        self.runs.append(run)

    def histogram(self, name: str) -> Histogram:
        merged = Histogram()
        for run in self.runs:
            data = run.result["histograms"].get(name)
            if data:
                merged.merge(Histogram.from_json(data))
        return merged

    @property
    def ok(self) -> int:
        return sum(r.ok for r in self.runs)

    @property
    def sent(self) -> int:
        return sum(r.sent for r in self.runs)

    @property
    def elapsed(self) -> float:
        return sum(float(r.result["elapsed_s"]) for r in self.runs)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def errors(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for run in self.runs:
            total.update(run.result["errors"])
        return dict(total)

    def target_cpu_s(self) -> float | None:
        tracks = [r.target_track for r in self.runs if r.target_track]
        return sum(t.cpu_s for t in tracks) if tracks else None

    def load_cpu_s(self) -> float:
        side = sum(r.load_track.cpu_s for r in self.runs if r.load_track)
        return side + sum(r.loadgen_cpu_s for r in self.runs)

    def cpu_busy(self) -> list[float]:
        """Per CPU, the busy share averaged over the rounds."""
        rows = [r.cpu_busy for r in self.runs if r.cpu_busy]
        return [round(sum(col) / len(col), 3) for col in zip(*rows, strict=True)]

    def rss_growth_per_run(self) -> list[int]:
        """Peak minus before, per run, bytes (what the open streams held)."""
        return [t.rss_peak - t.rss_before for r in self.runs if (t := r.target_track)]

    def summary(self, name: str) -> dict[str, float] | None:
        """p50 ... max in ms of the merged rounds; None when nothing was recorded."""
        hist = self.histogram(name)
        if not hist.count:
            return None
        return {k: float(v) for k, v in hist.summary_ms().items() if v is not None}
