"""The spine benchmark: what the proxy costs over calling the upstream directly, and
what admission costs inside the proxy.

``make bench`` (``python -m benchmarks.spine``) starts a throwaway Redis (or uses
REDIS_URL, under a key prefix of its own), the mock OpenAI upstream and two proxies, all
as subprocesses on 127.0.0.1, and drives them with closed-loop aiohttp workers from this
process. In both proxies authentication (a real ``qnp_`` key checked against Redis) and
the one event per request on the Redis stream are ON, as in production. Admission (one
Redis script per request for limits and credit, and a settlement after the response,
against the account state the benchmark publishes) is ON in ``proxy`` and OFF in
``proxy-noadmit`` (``QNP_ADMISSION=off``); nothing else differs.

Scenarios, each run against three targets: the upstream directly (``direct``),
``proxy`` and ``proxy-noadmit``:

- ``chat``: non-stream chat completions at ``--concurrency`` workers (throughput);
- ``stream``: streamed chat completions, 20 content chunks with no delay, at the same
  concurrency (time to the first body byte, and total time);
- ``latency``: non-stream at concurrency 1 (what one request pays for the extra hop).

How to read it: the machine is shared and noisy, so absolute numbers mean little. Each
scenario alternates targets round by round (direct, proxy, proxy-noadmit, direct, ...)
and the figures to compare are the ratios in the same run: ``proxy/direct rps`` (1.0 =
free) and ``added`` milliseconds (proxy minus direct, at p50 and p99); admission's cost
is ``proxy/proxy-noadmit rps`` and the milliseconds ``proxy`` adds over
``proxy-noadmit``. The load generator, the mock upstream, Redis and the proxies all
share this machine's cores, so a proxy's rps is also bounded by the CPU the other
processes take (the proxy not being measured sits idle; admission's own Redis work
counts against the proxy that does it, as it would on a shared host).
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks import loadgen
from benchmarks.loadgen import Load, Samples, Target
from benchmarks.stack import (
    MODEL,
    UNPUBLISHED_WARNING,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    Proxy,
    Stack,
    running_stack,
)

RESULTS = Path(__file__).resolve().parent / "results"
CHUNKS = 20
LIMITATION = (
    "Load generator, mock upstream, Redis and proxies share this machine "
    f"({os.cpu_count()} cores), so absolute numbers are modest; compare the ratios."
)
DIRECT, PROXY, NOADMIT = "direct", "proxy", "proxy-noadmit"
# Each comparison: (key in the JSON, the target measured, the target it is measured over).
COMPARISONS = (
    ("proxy_vs_direct", PROXY, DIRECT),
    ("noadmit_vs_direct", NOADMIT, DIRECT),
    ("admission_cost", PROXY, NOADMIT),
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


def _targets(stack: Stack) -> tuple[Target, ...]:
    """Direct first, then each proxy: the order every round visits them in."""
    direct = Target(DIRECT, f"{stack.upstream_url}/chat/completions",
                    {"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"})
    proxy_headers = {"Authorization": f"Bearer {stack.api_key}",
                     "Content-Type": "application/json"}
    return direct, *(Target(p.name, f"{p.url}/chat/completions", proxy_headers)
                     for p in stack.proxies)


def _model(target: Target) -> str:
    return UPSTREAM_MODEL if target.name == DIRECT else MODEL


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
) -> tuple[dict[str, dict[str, Measured]], Counter[str]]:
    """Every scenario, targets alternating; also how many requests each target answered
    (warm-up included)."""
    targets = _targets(stack)
    results: dict[str, dict[str, Measured]] = {}
    requests: Counter[str] = Counter()
    async with loadgen.new_session(2 * max(s.concurrency for s in scenarios)) as session:
        # Warm-up, discarded: connection pools, the proxies' key caches (one bcrypt per
        # worker process), admission's script load, and every server's first-request path.
        progress.show("warming up")
        for scenario in scenarios:
            for target in targets:
                load = Load(scenario.concurrency, args.warmup, args.max_requests,
                            _body(_model(target), scenario.stream), scenario.stream)
                warm = await loadgen.run(session, target, load)
                requests[target.name] += _attempts(warm)
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
                    requests[target.name] += _attempts(samples)
                    progress.show(f"{scenario.name}: round {round_no}/{args.rounds}, "
                                  f"{target.name}: {samples.rps:,.0f} rps, "
                                  f"{sum(samples.errors.values())} errors")
    progress.done()
    return results, requests


def _versus(measured: Measured, base: Measured) -> dict[str, Any]:
    """``measured`` over ``base``: rps ratio (overall and per round) and added ms."""
    m, b = measured.samples.summary(), base.samples.summary()

    def added(kind: str, q: str) -> float | None:
        if b[kind] is None or m[kind] is None:
            return None
        return float(round(m[kind][q] - b[kind][q], 3))

    round_ratios = [mr / br if br else math.nan for br, mr in zip(
        base.round_rps, measured.round_rps, strict=True)]
    return {
        "rps_ratio": round(m["rps"] / b["rps"], 4) if b["rps"] else None,
        "rps_ratio_by_round": [round(r, 4) for r in round_ratios],
        "added_latency_ms": {"p50": added("latency_ms", "p50"), "p99": added("latency_ms", "p99")},
        "added_ttfb_ms": {"p50": added("ttfb_ms", "p50"), "p99": added("ttfb_ms", "p99")},
    }


def _comparison(measured: dict[str, Measured]) -> dict[str, Any]:
    return {key: {"target": target, "over": base, **_versus(measured[target], measured[base])}
            for key, target, base in COMPARISONS}


def _ms(dist: dict[str, float] | None, q: str) -> str:
    return "–" if dist is None else f"{dist[q]:.2f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _comparison_row(scenario: str, c: dict[str, Any]) -> str:
    ratio = "–" if c["rps_ratio"] is None else f"{c['rps_ratio']:.2f}"
    by_round = " ".join(f"{r:.2f}" for r in c["rps_ratio_by_round"])
    return (
        f"| {scenario} | {c['target']}/{c['over']} | {ratio} | {by_round} "
        f"| {_signed(c['added_latency_ms']['p50'])} | {_signed(c['added_latency_ms']['p99'])} "
        f"| {_signed(c['added_ttfb_ms']['p50'])} | {_signed(c['added_ttfb_ms']['p99'])} |"
    )


_COMPARISON_HEAD = [
    "| scenario | measured/over | rps ratio | per round | added p50 ms | added p99 ms "
    "| added ttfb p50 | added ttfb p99 |",
    "|---|---|--:|---|--:|--:|--:|--:|",
]


def render(report: dict[str, Any]) -> str:
    """The markdown tables printed to stdout."""
    stack = report["stack"]
    counts = "; ".join(
        f"{name} (node {p['node_id']}): {p['events_emitted']} events for {p['requests']} "
        f"requests, {p['unpublished_state_warnings']} unpublished-state warnings, "
        f"{p['log_lines']} log lines"
        for name, p in stack["proxies"].items()
    )
    lines = [
        f"## Spine benchmark ({report['started_at']})", "",
        f"Each proxy: {stack['proxy_workers']} worker(s); auth ON (qnp_ key checked "
        "against Redis, cached after the first bcrypt); events ON (one per request to the "
        f"Redis stream). Admission ON in {PROXY} (Lua admit + settle per request, account "
        f"state published), OFF in {NOADMIT}. {counts}. Redis: {stack['redis']}. "
        f"{report['settings']['rounds']} rounds × {report['settings']['duration_s']} s per "
        "target, alternating.", "",
        "| scenario | target | conc | requests | rps | p50 ms | p90 ms | p99 ms "
        "| ttfb p50 | ttfb p99 | errors |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for sc in report["scenarios"]:
        for name, t in sc["targets"].items():
            lat, ttfb = t["latency_ms"], t["ttfb_ms"]
            errors = ", ".join(f"{k}: {v}" for k, v in t["errors"].items()) or "0"
            lines.append(
                f"| {sc['name']} | {name} | {sc['concurrency']} | {t['requests_ok']} "
                f"| {t['rps']:,.0f} | {_ms(lat, 'p50')} | {_ms(lat, 'p90')} | {_ms(lat, 'p99')} "
                f"| {_ms(ttfb, 'p50')} | {_ms(ttfb, 'p99')} | {errors} |"
            )
    lines += ["", "What the proxy costs over calling the upstream directly:", "",
              *_COMPARISON_HEAD]
    for key in ("proxy_vs_direct", "noadmit_vs_direct"):
        lines += [_comparison_row(sc["name"], sc["comparison"][key])
                  for sc in report["scenarios"]]
    lines += ["", f"What admission costs ({PROXY} over {NOADMIT}):", "", *_COMPARISON_HEAD]
    lines += [_comparison_row(sc["name"], sc["comparison"]["admission_cost"])
              for sc in report["scenarios"]]
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


def _wait_for_events(stack: Stack, expected: Counter[str], timeout: float = 3.0) -> Counter[str]:
    """Events by node id. They are flushed in batches; give the last batch a moment to
    land (``expected`` is by node id too)."""
    deadline = time.monotonic() + timeout
    counts = stack.event_counts()
    while (any(counts[node] < n for node, n in expected.items())
           and time.monotonic() < deadline):
        time.sleep(0.05)
        counts = stack.event_counts()
    return counts


def _proxy_report(proxy: Proxy, requests: int, events: int) -> dict[str, Any]:
    log = proxy.log_lines()  # it logs at WARNING, so any line here is worth a look
    return {
        "node_id": proxy.node_id, "admission": proxy.admission,
        "requests": requests,  # warm-up included
        "events_emitted": events,
        "unpublished_state_warnings": sum(UNPUBLISHED_WARNING in line for line in log),
        "log_lines": len(log),
        "log_head": log[:5],
    }


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
    progress.show("starting Redis, mock upstream and proxies")
    with running_stack(redis_url=redis_url, workers=args.workers, chunks=CHUNKS,
                       base_env=os.environ) as stack:
        results, requests = _run_loop(_measure(stack, scenarios, args, progress))
        events = _wait_for_events(
            stack, Counter({p.node_id: requests[p.name] for p in stack.proxies}))
        proxies = {p.name: _proxy_report(p, requests[p.name], events[p.node_id])
                   for p in stack.proxies}
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
            "auth": True, "events": True, "proxies": proxies,
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
        "Proxy (admission on and off) vs. calling the mock upstream directly: rps and "
        "added latency, same run."))
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (default 3)")
    parser.add_argument("--duration", type=float, default=3.0, metavar="SECONDS",
                        help="length of one round against one target (default 3)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="closed-loop workers for the chat and stream scenarios (default 32)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes in each proxy (default 1)")
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
