"""``python -m benchmarks`` (``make bench``): the benchmark suite of issue 6.

Starts the stack (Redis, the mock upstream, the reference passthrough, our proxy with
auth, admission and events on, our proxy as any ``--baseline`` commit built it, and any
``--target`` a user points it at), pins it,
runs the selected scenarios with targets alternating round by round, and writes
``report.json``, ``report.md`` and PNG plots to ``benchmarks/results/<UTC time>/``,
with one progress line on stderr while it runs. See README.md, "Benchmarks".

Owns: the command line, the run's plan and order, machine facts, the checks on our
proxies (one event per request, admission never degraded) and writing the results.
Must not import ``proxy`` or ``control_plane``: everything measured runs in subprocesses.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import psutil

from benchmarks import baseline, plots, report, scenarios
from benchmarks.measure import Load, Progress, Runner
from benchmarks.processes import raise_fd_limit
from benchmarks.scenarios import Settings, redacted
from benchmarks.stack import (
    DEGRADED_ERROR,
    PROXY,
    ROOT,
    UNPUBLISHED_WARNING,
    Pinning,
    StackSpec,
    Target,
    cpu_list,
    running_stack,
)

RESULTS = ROOT / "benchmarks" / "results"
ORDER = ("nonstream", "stream", "latency", "paced", "capacity", "sweep", "workers", "soak")
# (full, --quick) defaults of the flags --quick shrinks; an explicit flag always wins.
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "rounds": (3, 1), "duration": (5.0, 1.0), "warmup": (1.0, 0.3), "concurrency": (64, 16),
    "paced_streams": (1000, 100), "capacity_streams": (5000, 200),
    "paced_model": ("mock-ttft200-chunks50-delay20", "mock-ttft200-chunks50-delay20"),
    "capacity_model": ("mock-ttft200-chunks10-delay500", "mock-ttft100-chunks10-delay100"),
    "sweep_rates": ("250,500,1000,1500,2000,2500,3000,4000,5000,6000", "200,500"),
    "soak_minutes": (10.0, 0.0),
}
_PACKAGES = ("aiohttp", "uvloop", "redis", "hiredis", "orjson", "httptools", "psutil",
             "matplotlib")


def _pairs(values: Sequence[str], flag: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            parser.error(f"{flag} wants NAME=VALUE, got {value!r}")
        out[name] = rest
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "QNP benchmark suite: direct (the mock), the reference passthrough, our proxy "
        "and any --target, alternating in one run. Results in benchmarks/results/."))
    a = p.add_argument
    a("--quick", action="store_true", help="a ~1-minute smoke run (short rounds, small "
      "stream counts, two sweep rates, no soak unless --soak-minutes is given)")
    a("--scenarios", default=",".join(ORDER), help=f"comma-separated subset of {', '.join(ORDER)}")
    a("--rounds", type=int, help="rounds per target and scenario (default 3)")
    a("--duration", type=float, help="seconds per round and target (default 5)")
    a("--warmup", type=float, help="discarded warm-up per target and scenario (default 1 s)")
    a("--concurrency", type=int, help="closed-loop connections, non-stream and stream (64)")
    a("--paced-streams", type=int, help="concurrent paced streams (default 1000)")
    a("--paced-model", help="mock model of the paced streams (mock-ttft200-chunks50-delay20)")
    a("--capacity-streams", type=int, help="concurrent streams of paced-capacity (5000)")
    a("--capacity-model", help="mock model of paced-capacity (mock-ttft200-chunks10-delay500)")
    a("--paced-loop", choices=("open", "closed"), default="open", help="paced streams "
      "started evenly spread (open, default) or all at once and kept in lockstep (closed)")
    a("--sweep-rates", help="open-loop rates/s, ascending (250,500,...,6000)")
    a("--soak-minutes", type=float, help="soak length, 0 skips it (default 10)")
    a("--soak-rate", type=float, help="soak rate/s (default: half the proxy's best sweep "
      "rate, else 1000)")
    a("--proxy-cpus", help="CPUs of the proxy and passthrough, e.g. 0 (default: first CPU)")
    a("--load-cpus", help="CPUs of mock, load generator, Redis, e.g. 1 (default: the next)")
    a("--with-noadmit", action="store_true", help="also measure our proxy with admission off")
    a("--with-tls", action="store_true", help="also measure our proxy serving HTTPS itself "
      "(proxy-tls, a throwaway certificate): what TLS costs, against plain proxy")
    a("--with-sentry", action="store_true", help="also measure our proxy with SENTRY_DSN "
      "set (proxy-sentry, reporting to a local sink): what the SDK costs, against plain proxy")
    a("--baseline", action="append", default=[], metavar="REF",
      help="also measure our proxy as git commit REF built it, labelled proxy@REF "
      "(same catalog, key and pinning; repeatable)")
    a("--target", action="append", default=[], metavar="NAME=URL",
      help="an external OpenAI-compatible base URL ending in /v1 (repeatable)")
    a("--target-key", action="append", default=[], metavar="NAME=KEY",
      help="Bearer key for that target")
    a("--target-pid", action="append", default=[], metavar="NAME=PID",
      help="sample that target's process tree for CPU and RSS")
    a("--mock-port", type=int, help="fixed port of the mock (to point another gateway at)")
    a("--mock-processes", type=int, default=1, help="mock processes (default 1)")
    a("--loadgen-processes", type=int, default=1, help="load generator processes (default 1)")
    a("--timeout", type=float, default=30.0, help="per-request timeout, s (default 30)")
    a("--output-dir", type=Path, help="default benchmarks/results/<UTC time>")
    args = p.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := set(args.scenarios) - set(ORDER):
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    args.sweep_rates = tuple(sorted(float(r) for r in str(args.sweep_rates).split(",") if r))
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0 or not args.sweep_rates:
        p.error("--rounds >= 1, --duration > 0, --warmup >= 0 and a sweep rate are needed")
    targets, keys = _pairs(args.target, "--target", p), _pairs(args.target_key, "--target-key", p)
    pids = {n: int(v) for n, v in _pairs(args.target_pid, "--target-pid", p).items()}
    if stray := (set(keys) | set(pids)) - set(targets):
        p.error(f"--target-key/--target-pid for unknown targets: {', '.join(sorted(stray))}")
    args.externals = {n: (url, keys.get(n), pids.get(n)) for n, url in targets.items()}
    if len(set(args.baseline)) != len(args.baseline):
        p.error("--baseline given twice for one ref")
    if clash := {baseline.name_for(r) for r in args.baseline} & set(targets):
        p.error(f"--target names taken by baselines: {', '.join(sorted(clash))}")
    return args


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip()
    return None


def machine_info() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model or platform.processor() or "unknown CPU",
        "cpu_count": os.cpu_count(), "cpus_allowed": cpu_list(os.sched_getaffinity(0)),
        "memory_mb": psutil.virtual_memory().total // 2**20,
        "kernel": f"{platform.system()} {platform.release()}", "platform": platform.platform(),
        "python": sys.version.split()[0], "load_average": list(os.getloadavg()),
        "packages": {p: _version(p) for p in _PACKAGES},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _plan(args: argparse.Namespace, s: Settings, n_targets: int) -> float:
    """Estimated seconds of the whole run, for the ETA."""
    by_key = scenarios.scenarios_by_key(s)
    total = sum(scenarios.rounds_estimate(sc, s, n_targets)
                for key in args.scenarios for sc in by_key.get(key, []))
    one = Load("mock", False, s.duration, s.concurrency)
    if "sweep" in args.scenarios:
        total += n_targets * len(s.sweep_rates) * one.estimate()
    if "workers" in args.scenarios:
        total += 2 * s.rounds * one.estimate()
    if "soak" in args.scenarios and s.soak_minutes > 0:
        total += s.soak_minutes * 60
    return total


def _proxy_report(target: Target, runner: Runner) -> dict[str, Any]:
    log = target.log.read_text(errors="replace").splitlines() if target.log else []
    return {
        "requests": runner.requests[target.name],  # warm-ups included
        "events_emitted": runner.events[target.name],
        "unpublished_state_warnings": sum(UNPUBLISHED_WARNING in line for line in log),
        "degraded_admission_errors": sum(DEGRADED_ERROR in line for line in log),
        "log_lines": len(log), "log_head": log[:5],  # it logs at WARNING: all worth a look
    }


def measure(args: argparse.Namespace, s: Settings, pinning: Pinning,
            tmp: Path) -> dict[str, Any]:
    """Run the stack and the scenarios; everything for the report but machine facts."""
    baselines = [baseline.export(ref, tmp) for ref in args.baseline]
    spec = StackSpec(s.models, pinning, os.environ.get("REDIS_URL") or None, args.mock_port,
                     args.mock_processes, args.with_noadmit, args.externals,
                     {b.name: b.tree for b in baselines}, with_tls=args.with_tls,
                     with_sentry=args.with_sentry)
    entries: list[dict[str, Any]] = []
    with running_stack(spec, os.environ, tmp) as stack:
        targets = stack.targets
        progress = Progress(_plan(args, s, len(targets)))
        runner = Runner(stack, tmp, progress, loadgen_processes=args.loadgen_processes,
                        timeout=args.timeout, sample_every=0.1)
        ours = [t for t in targets if t.is_ours]
        by_key = scenarios.scenarios_by_key(s)
        best = None
        try:
            for key in args.scenarios:
                for sc in by_key.get(key, []):
                    entries.append(scenarios.run_rounds(runner, targets, sc, s)[0])
                if key == "sweep":
                    entries.append(sweep := scenarios.run_sweep(runner, targets, s))
                    best = sweep["best_rate"].get(PROXY)
                elif key == "workers":
                    proxy = next(t for t in targets if t.name == PROXY)
                    with stack.proxy(f"{PROXY}-w2", workers=2, cpus=pinning.both) as w2:
                        ours.append(w2)
                        entries.append(scenarios.run_workers(runner, proxy, w2, s))
                elif key == "soak" and s.soak_minutes > 0:
                    rate = s.soak_rate or (best / 2 if best else 1000.0)
                    proxy = next(t for t in targets if t.name == PROXY)
                    entries.append(scenarios.run_soak(runner, proxy, rate, s))
        finally:
            progress.finish()
        return {
            "scenarios": entries,
            "targets": {t.name: {"url": t.base_url, "role": t.role, "cpus": t.cpus}
                        for t in targets},
            "proxies": {t.name: _proxy_report(t, runner) for t in ours},
            "baselines": {b.name: b.to_json() for b in baselines},
            "processes": {**stack.commands(), **({"redis": {
                "argv": ["devstack.servers.start_redis()"], "pid": stack.redis_pid,
                "cpus": cpu_list(pinning.load) if pinning.load else None}}
                if stack.redis_pid else {})},
            "redis": {"kind": "throwaway (devstack)" if stack.redis_pid else "REDIS_URL",
                      "prefix": stack.names.prefix},
        }


def run(args: argparse.Namespace) -> Path:
    started = datetime.datetime.now(datetime.UTC)
    machine = machine_info()  # before we add our own load
    pinning = Pinning.choose(args.proxy_cpus, args.load_cpus)
    if pinning.load is not None:
        # The suite itself (sampling, reading results) stays off the proxy's CPU.
        os.sched_setaffinity(0, pinning.load)
    raise_fd_limit()
    s = Settings(
        rounds=args.rounds, duration=args.duration, warmup=args.warmup,
        concurrency=args.concurrency, paced_streams=args.paced_streams,
        paced_model=args.paced_model, capacity_streams=args.capacity_streams,
        capacity_model=args.capacity_model, paced_loop=args.paced_loop,
        sweep_rates=args.sweep_rates,
        soak_minutes=args.soak_minutes if "soak" in args.scenarios else 0.0,
        soak_rate=args.soak_rate,
        load_cpus=len(pinning.load) if pinning.load else os.cpu_count() or 1)
    folder = args.output_dir or RESULTS / started.strftime("%Y%m%dT%H%M%SZ")
    with tempfile.TemporaryDirectory(prefix="qnp-bench-") as tmp:
        measured = measure(args, s, pinning, Path(tmp))
    out: dict[str, Any] = {
        "suite": "qnp-bench", "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": redacted([sys.executable, *sys.orig_argv[1:]]),
        "settings": {"rounds": s.rounds, "duration_s": s.duration, "warmup_s": s.warmup,
                     "concurrency": s.concurrency, "paced_streams": s.paced_streams,
                     "paced_model": s.paced_model, "capacity_streams": s.capacity_streams,
                     "capacity_model": s.capacity_model, "paced_loop": s.paced_loop,
                     "sweep_rates": list(s.sweep_rates),
                     "soak_minutes": s.soak_minutes, "scenarios": args.scenarios,
                     "loadgen_processes": args.loadgen_processes,
                     "mock_processes": args.mock_processes, "with_tls": args.with_tls,
                     "with_sentry": args.with_sentry},
        "machine": machine,
        "pinning": {"proxy": cpu_list(pinning.proxy) if pinning.proxy else None,
                    "load": cpu_list(pinning.load) if pinning.load else None,
                    "note": pinning.note},
        **measured,
    }
    out["issue_targets"] = report.issue_targets(out)
    out["baseline_targets"] = report.baseline_targets(out)
    folder.mkdir(parents=True, exist_ok=True)
    out["plots"] = plots.draw(out, folder)
    (folder / "report.json").write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    (folder / "report.md").write_text(report.render(out))
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, through the finally blocks that stop our servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        folder = run(args)
    except baseline.BaselineError as e:
        print(f"benchmarks: --baseline: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        lead = "\n" if sys.stderr.isatty() else ""  # below the progress line
        print(f"{lead}interrupted: servers stopped", file=sys.stderr)
        return 130
    print((folder / "report.md").read_text())
    print(f"Results: {folder}")
    return 0
