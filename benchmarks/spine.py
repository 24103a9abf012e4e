"""The spine benchmark: what the proxy costs over calling the upstream directly.

``make bench`` (``python -m benchmarks.spine``) starts a throwaway Redis (or uses
REDIS_URL, under a key prefix of its own), the mock OpenAI upstream and the proxy, all
as subprocesses on 127.0.0.1, and drives them with closed-loop aiohttp workers from this
process. Authentication (a real ``qnp_`` key checked against Redis) and the one event
per request on the Redis stream are ON, as in production.

Scenarios, each run against the upstream directly and through the proxy:

- ``chat``: non-stream chat completions at ``--concurrency`` workers (throughput);
- ``stream``: streamed chat completions, 20 content chunks with no delay, at the same
  concurrency (time to the first body byte, and total time);
- ``latency``: non-stream at concurrency 1 (what one request pays for the extra hop).

How to read it: the machine is shared and noisy, so absolute numbers mean little. Each
scenario alternates targets round by round (direct, proxy, direct, proxy, ...) and the
figures to compare are the ratios in the same run: ``proxy/direct rps`` (1.0 = free)
and ``added`` milliseconds (proxy minus direct, at p50 and p99). The load generator,
the mock upstream, Redis and the proxy all share this machine's cores, so the proxy's
rps is also bounded by the CPU the other processes take.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks import loadgen
from benchmarks.loadgen import Load, Samples, Target
from benchmarks.stack import MODEL, UPSTREAM_KEY, UPSTREAM_MODEL, Stack, running_stack

RESULTS = Path(__file__).resolve().parent / "results"
CHUNKS = 20
LIMITATION = (
    "Load generator, mock upstream, Redis and proxy share this machine "
    f"({os.cpu_count()} cores), so absolute numbers are modest; compare the ratios."
)
_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say hello to the benchmark in a few words."},
]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    stream: bool
    concurrency: int


def _attempts(samples: Samples) -> int:
    return samples.ok + sum(samples.errors.values())


@dataclass
class Measured:
    """One scenario against one target, all rounds merged, plus each round's rps."""

    samples: Samples = field(default_factory=Samples)
    round_rps: list[float] = field(default_factory=list)


def _body(model: str, stream: bool) -> bytes:
    payload: dict[str, Any] = {"model": model, "messages": _MESSAGES, "max_tokens": 64}
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    return orjson.dumps(payload)


def _targets(stack: Stack) -> tuple[Target, Target]:
    direct = Target("direct", f"{stack.upstream_url}/chat/completions",
                    {"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"})
    proxy = Target("proxy", f"{stack.proxy_url}/chat/completions",
                   {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"})
    return direct, proxy


def _model(target: Target) -> str:
    return MODEL if target.name == "proxy" else UPSTREAM_MODEL


class Progress:
    """One line on stderr, rewritten in place on a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{text}")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


async def _measure(
    stack: Stack, scenarios: Sequence[Scenario], args: argparse.Namespace, progress: Progress
) -> tuple[dict[str, dict[str, Measured]], int]:
    """Every scenario, targets alternating; also how many requests the proxy answered."""
    targets = _targets(stack)
    results: dict[str, dict[str, Measured]] = {}
    proxy_requests = 0
    async with loadgen.new_session(2 * max(s.concurrency for s in scenarios)) as session:
        # Warm-up, discarded: connection pools, the proxy's key cache (one bcrypt per
        # worker process), and both servers' first-request paths.
        progress.show("warming up")
        for scenario in scenarios:
            for target in targets:
                load = Load(scenario.concurrency, args.warmup, args.max_requests,
                            _body(_model(target), scenario.stream), scenario.stream)
                warm = await loadgen.run(session, target, load)
                proxy_requests += _attempts(warm) if target.name == "proxy" else 0
        for scenario in scenarios:
            measured = results[scenario.name] = {t.name: Measured() for t in targets}
            for round_no in range(1, args.rounds + 1):
                for target in targets:
                    progress.show(f"{scenario.name}: round {round_no}/{args.rounds}, "
                                  f"{target.name} (concurrency {scenario.concurrency})")
                    load = Load(scenario.concurrency, args.duration, args.max_requests,
                                _body(_model(target), scenario.stream), scenario.stream)
                    samples = await loadgen.run(session, target, load)
                    measured[target.name].samples.extend(samples)
                    measured[target.name].round_rps.append(samples.rps)
                    proxy_requests += _attempts(samples) if target.name == "proxy" else 0
                    progress.show(f"{scenario.name}: round {round_no}/{args.rounds}, "
                                  f"{target.name}: {samples.rps:,.0f} rps, "
                                  f"{sum(samples.errors.values())} errors")
    progress.done()
    return results, proxy_requests


def _comparison(measured: dict[str, Measured]) -> dict[str, Any]:
    direct, proxy = measured["direct"], measured["proxy"]
    d, p = direct.samples.summary(), proxy.samples.summary()

    def added(kind: str, q: str) -> float | None:
        if d[kind] is None or p[kind] is None:
            return None
        return float(round(p[kind][q] - d[kind][q], 3))

    round_ratios = [pr / dr if dr else math.nan for dr, pr in zip(
        direct.round_rps, proxy.round_rps, strict=True)]
    return {
        "rps_ratio": round(p["rps"] / d["rps"], 4) if d["rps"] else None,
        "rps_ratio_by_round": [round(r, 4) for r in round_ratios],
        "added_latency_ms": {"p50": added("latency_ms", "p50"), "p99": added("latency_ms", "p99")},
        "added_ttfb_ms": {"p50": added("ttfb_ms", "p50"), "p99": added("ttfb_ms", "p99")},
    }


def _ms(dist: dict[str, float] | None, q: str) -> str:
    return "–" if dist is None else f"{dist[q]:.2f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def render(report: dict[str, Any]) -> str:
    """The markdown tables printed to stdout."""
    lines = [
        f"## Spine benchmark ({report['started_at']})", "",
        f"Proxy: {report['stack']['proxy_workers']} worker(s); auth ON (qnp_ key checked "
        "against Redis, cached after the first bcrypt); events ON (one per request to the "
        f"Redis stream; {report['stack']['events_emitted']} emitted for "
        f"{report['stack']['proxy_requests']} proxy requests). Redis: "
        f"{report['stack']['redis']}. {report['settings']['rounds']} rounds × "
        f"{report['settings']['duration_s']} s per target, alternating.", "",
        "| scenario | target | conc | requests | rps | p50 ms | p90 ms | p99 ms "
        "| ttfb p50 | ttfb p99 | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for sc in report["scenarios"]:
        for name in ("direct", "proxy"):
            t = sc["targets"][name]
            lat, ttfb = t["latency_ms"], t["ttfb_ms"]
            errors = ", ".join(f"{k}: {v}" for k, v in t["errors"].items()) or "0"
            lines.append(
                f"| {sc['name']} | {name} | {sc['concurrency']} | {t['requests_ok']} "
                f"| {t['rps']:,.0f} | {_ms(lat, 'p50')} | {_ms(lat, 'p90')} | {_ms(lat, 'p99')} "
                f"| {_ms(ttfb, 'p50')} | {_ms(ttfb, 'p99')} | {errors} |"
            )
    lines += [
        "", "| scenario | proxy/direct rps | per round | added p50 ms | added p99 ms "
        "| added ttfb p50 | added ttfb p99 |", "|---|--:|---|--:|--:|--:|--:|",
    ]
    for sc in report["scenarios"]:
        c = sc["comparison"]
        ratio = "–" if c["rps_ratio"] is None else f"{c['rps_ratio']:.2f}"
        by_round = " ".join(f"{r:.2f}" for r in c["rps_ratio_by_round"])
        lines.append(
            f"| {sc['name']} | {ratio} | {by_round} | {_signed(c['added_latency_ms']['p50'])} "
            f"| {_signed(c['added_latency_ms']['p99'])} | {_signed(c['added_ttfb_ms']['p50'])} "
            f"| {_signed(c['added_ttfb_ms']['p99'])} |"
        )
    lines += ["", f"Note: {LIMITATION}"]
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=RESULTS.parent.parent,
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    return None


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "packages": {p: _version(p) for p in ("aiohttp", "uvloop", "redis", "orjson")},
        "git_commit": _git_commit(),
    }


def _wait_for_events(stack: Stack, expected: int, timeout: float = 3.0) -> int:
    """Events are flushed in batches; give the last batch a moment to land."""
    deadline = time.monotonic() + timeout
    count = stack.event_count()
    while count < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        count = stack.event_count()
    return count


async def _interruptible(coro: Any) -> Any:
    """Ctrl-C or SIGTERM cancels the load cleanly (no KeyboardInterrupt inside a callback)."""
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await coro


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(_interruptible(coro))
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


def benchmark(args: argparse.Namespace, redis_url: str | None) -> dict[str, Any]:
    scenarios = [
        Scenario("chat", "non-stream chat completions", False, args.concurrency),
        Scenario("stream", f"streamed chat completions, {CHUNKS} chunks", True, args.concurrency),
        Scenario("latency", "non-stream chat completions, one at a time", False, 1),
    ]
    started = datetime.datetime.now(datetime.UTC)
    machine = machine_info()  # load average before we add our own load
    progress = Progress()
    progress.show("starting Redis, mock upstream and proxy")
    with running_stack(redis_url=redis_url, workers=args.workers, chunks=CHUNKS,
                       base_env=os.environ) as stack:
        results, proxy_total = _run_loop(_measure(stack, scenarios, args, progress))
        events = _wait_for_events(stack, proxy_total)
        redis_kind = "throwaway (devstack)" if stack.redis_is_ours else "REDIS_URL"
        prefix = stack.names.prefix  # every key under it is deleted on exit
    return {
        "benchmark": "spine",
        "started_at": started.isoformat(timespec="seconds"),
        "command": sys.orig_argv,
        "settings": {
            "rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
            "concurrency": args.concurrency, "max_requests_per_round": args.max_requests,
            "stream_chunks": CHUNKS,
        },
        "machine": machine,
        "stack": {
            "proxy_workers": args.workers, "redis": redis_kind, "redis_prefix": prefix,
            "auth": True, "events": True,
            "events_emitted": events, "proxy_requests": proxy_total,  # warm-up included
        },
        "scenarios": [
            {
                "name": s.name, "description": s.description, "stream": s.stream,
                "concurrency": s.concurrency,
                "targets": {
                    name: {**m.samples.summary(), "rps_by_round": [round(r, 2) for r in
                                                                   m.round_rps]}
                    for name, m in results[s.name].items()
                },
                "comparison": _comparison(results[s.name]),
            }
            for s in scenarios
        ],
        "limitation": LIMITATION,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.spine", description=(
        "Proxy vs. calling the mock upstream directly: rps and added latency, same run."))
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (default 3)")
    parser.add_argument("--duration", type=float, default=3.0, metavar="SECONDS",
                        help="length of one round against one target (default 3)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="closed-loop workers for the chat and stream scenarios (default 32)")
    parser.add_argument("--workers", type=int, default=1, help="proxy worker processes")
    parser.add_argument("--max-requests", type=int, default=200_000,
                        help="cap on requests per round, whatever the duration")
    parser.add_argument("--warmup", type=float, default=1.0, metavar="SECONDS",
                        help="discarded warm-up per scenario and target (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a ~10 s smoke run: 2 rounds of 0.5 s, 0.2 s warm-up")
    parser.add_argument("--output", type=Path, help="JSON result file "
                        "(default benchmarks/results/spine-<timestamp>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 2, 0.5, 0.2
    for name in ("rounds", "concurrency", "workers", "max_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.duration <= 0 or args.warmup < 0:
        parser.error("--duration must be > 0 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, through the finally blocks that stop our servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = benchmark(args, os.environ.get("REDIS_URL") or None)
    except KeyboardInterrupt:
        lead = "\n" if sys.stderr.isatty() else ""  # below the progress line
        print(f"{lead}interrupted: servers stopped", file=sys.stderr)
        return 130
    output = args.output or RESULTS / f"spine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(render(report))
    print(f"\nFull results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
