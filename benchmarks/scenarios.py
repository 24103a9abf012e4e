"""The scenarios of the benchmark suite, each measuring every target in the same run.

Owns: what each scenario sends (model, stream or not, concurrency or rate, duration),
alternating targets round by round (direct, passthrough, proxy, ..., direct, ...) so a
noisy machine's drift hits every target alike, and turning the merged rounds into the
figures the report shows: rps, percentiles, "added" milliseconds and ratios against
``direct`` and ``passthrough`` (and our proxy against each baseline commit of it), CPU
µs per request or chunk, rps per core, RSS per open stream, the sweep's highest clean
rate, workers scaling and the soak's RSS growth.

Must not import ``proxy`` or ``control_plane``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.measure import Load, Measured, Run, Runner, model_shape, stream_lifetime
from benchmarks.stack import (
    BASELINE_PREFIX,
    DIRECT,
    PASSTHROUGH,
    PROXY,
    PROXY_SENTRY,
    PROXY_TLS,
    Target,
)

ADDED_P99_BUDGET_MS = 5.0  # the sweep's bar: highest rate with added p99 under this
_HEADLINE = ("latency", "ttft", "gap", "total")


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int
    duration: float
    warmup: float
    concurrency: int
    paced_streams: int
    paced_model: str
    capacity_streams: int
    capacity_model: str
    paced_loop: str  # "open" or "closed"
    sweep_rates: tuple[float, ...]
    soak_minutes: float
    soak_rate: float | None
    load_cpus: int  # how many CPUs the load side may use, for its CPU share

    @property
    def models(self) -> tuple[str, ...]:
        return ("mock", "mock-chunks20", self.paced_model, self.capacity_model)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A scenario measured in rounds: every target, ``rounds`` times, alternating."""

    name: str
    description: str
    load: Load
    plot: tuple[str, ...]  # histograms whose CDF per target is drawn
    open_streams: int | None = None  # paced scenarios: report RSS per open stream


def paced_load(model: str, streams: int, s: Settings) -> Load:
    """``streams`` concurrent paced streams. Open loop by default: one starts every
    lifetime/streams seconds, so their chunks are spread evenly over time as independent
    clients' would be (a closed loop starts them all in the same millisecond and keeps
    them in lockstep, every chunk of every stream in one burst, which measures the load
    generator's burst queueing as much as the target). Twice a lifetime at least: one to
    ramp up to ``streams`` open, one at that level."""
    life = stream_lifetime(model)
    if s.paced_loop == "closed":
        return Load(model, True, max(s.duration, life), concurrency=streams)
    return Load(model, True, max(s.duration, 2 * life), rate=round(streams / life, 3),
                connections=streams + streams // 4 + 64)


def scenarios_by_key(s: Settings) -> dict[str, list[Scenario]]:
    """The round-based scenarios, by the ``--scenarios`` name that selects them."""
    c = s.concurrency
    return {
        "nonstream": [Scenario("nonstream", f"non-stream, closed loop at concurrency {c}",
                               Load("mock", False, s.duration, c), ("latency",))],
        "stream": [Scenario("stream", f"20-chunk streams, no delay, concurrency {c}",
                            Load("mock-chunks20", True, s.duration, c), ("ttft", "total"))],
        "latency": [
            Scenario("latency", "non-stream, one request at a time",
                     Load("mock", False, s.duration, 1), ("latency",)),
            Scenario("latency-stream", "20-chunk streams, one at a time",
                     Load("mock-chunks20", True, s.duration, 1), ("ttft",)),
        ],
        "paced": [Scenario("paced", f"{s.paced_streams} concurrent paced streams "
                           f"({s.paced_model}, {s.paced_loop} loop)",
                           paced_load(s.paced_model, s.paced_streams, s), ("gap", "ttft"),
                           s.paced_streams)],
        "capacity": [Scenario("paced-capacity", f"{s.capacity_streams} concurrent paced "
                              f"streams ({s.capacity_model}, {s.paced_loop} loop)",
                              paced_load(s.capacity_model, s.capacity_streams, s),
                              ("gap", "ttft"), s.capacity_streams)],
    }


def alternate(runner: Runner, targets: Sequence[Target], load: Load, s: Settings,
              name: str) -> dict[str, Measured]:
    """A discarded warm-up per target, then ``s.rounds`` rounds visiting every target."""
    measured = {t.name: Measured() for t in targets}
    if s.warmup > 0:
        for t in targets:
            runner.run(t, dataclasses.replace(load, duration=s.warmup),
                       f"{name}: warm-up, {t.name}")
    for r in range(1, s.rounds + 1):
        for t in targets:
            run = runner.run(t, load, f"{name}: round {r}/{s.rounds}, {t.name}")
            measured[t.name].add(run)
    return measured


def target_figures(m: Measured, load: Load, s: Settings,
                   open_streams: int | None = None) -> dict[str, Any]:
    """What one target did in one scenario."""
    cpu = m.target_cpu_s()
    chunks = model_shape(load.model)[1] if load.stream else None
    out: dict[str, Any] = {
        "sent": m.sent, "ok": m.ok, "errors": m.errors(), "elapsed_s": round(m.elapsed, 3),
        "rps": round(m.rps, 2),
        "rps_by_round": [round(r.ok / float(r.result["elapsed_s"]), 2) for r in m.runs
                         if float(r.result["elapsed_s"]) > 0],
        "summary_ms": {h: m.summary(h) for h in ("latency", "service", "ttft", "gap", "total")},
        "cpu_s": None if cpu is None else round(cpu, 4),
        "cpu_us_per_request": _per(cpu, m.ok, 1e6),
        "cpu_us_per_chunk": _per(cpu, m.ok * chunks, 1e6) if chunks else None,
        "rps_per_core": _per(m.ok, cpu),
        "load_cpu_share": _per(m.load_cpu_s(), m.elapsed * s.load_cpus),
        "cpu_busy": m.cpu_busy(),
        "loadgen_commands": [redacted(r.argv) for r in m.runs],
    }
    tracks = [r.target_track for r in m.runs if r.target_track]
    if tracks:
        out["rss_before_mb"] = round(min(t.rss_before for t in tracks) / 2**20, 2)
        out["rss_peak_mb"] = round(max(t.rss_peak for t in tracks) / 2**20, 2)
        if open_streams:
            grown = max(m.rss_growth_per_run(), default=0)
            out["rss_per_open_stream_kb"] = round(grown / open_streams / 1024, 2)
    return out


def _per(x: float | None, y: float | None, scale: float = 1.0) -> float | None:
    if x is None or not y:
        return None
    return round(x / y * scale, 3)


def _per_core(run: Run) -> float | None:
    track = run.target_track
    return run.ok / track.cpu_s if track and track.cpu_s > 0 and run.ok else None


def compare(m: Measured, base: Measured) -> dict[str, Any]:
    """``m`` over ``base``: rps ratio and rps-per-core ratio (overall and per round, so
    their spread shows what a difference is worth), CPU per request ratio, added ms."""
    added: dict[str, dict[str, float]] = {}
    for h in _HEADLINE:
        mine, theirs = m.summary(h), base.summary(h)
        if mine and theirs:
            added[h] = {q: round(mine[q] - theirs[q], 3) for q in ("p50", "p90", "p99")}
    rounds = [a.ok / float(a.result["elapsed_s"]) / (b.ok / float(b.result["elapsed_s"]))
              for a, b in zip(m.runs, base.runs, strict=False)
              if b.ok and float(a.result["elapsed_s"]) > 0 and float(b.result["elapsed_s"]) > 0]
    cpu_m, cpu_b = m.target_cpu_s(), base.target_cpu_s()
    per_core = (m.ok / cpu_m) / (base.ok / cpu_b) if cpu_m and cpu_b and base.ok and m.ok \
        else None
    by_round = [a / b for ra, rb in zip(m.runs, base.runs, strict=False)
                if (a := _per_core(ra)) is not None and (b := _per_core(rb)) is not None]
    return {
        "rps_ratio": _per(m.rps, base.rps),
        "rps_ratio_by_round": [round(r, 3) for r in rounds],
        "rps_per_core_ratio": None if per_core is None else round(per_core, 3),
        "rps_per_core_ratio_by_round": [round(r, 3) for r in by_round],
        # CPU per request (or chunk: the same load for both) is the inverse of the above.
        "cpu_per_request_ratio": None if not per_core else round(1 / per_core, 3),
        "added_ms": added,
    }


def comparisons(measured: dict[str, Measured]) -> dict[str, dict[str, Any]]:
    """Every target against direct and against the reference passthrough; our proxy
    also against each baseline (itself as another commit built it)."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in measured.items():
        if name == DIRECT:
            continue
        out[name] = {"vs_direct": compare(m, measured[DIRECT])}
        if name != PASSTHROUGH and PASSTHROUGH in measured:
            out[name]["vs_passthrough"] = compare(m, measured[PASSTHROUGH])
    for variant in (PROXY_TLS, PROXY_SENTRY):  # what TLS, Sentry cost: same proxy, same run
        if variant in measured and PROXY in measured:
            out[variant]["vs_plain"] = compare(measured[variant], measured[PROXY])
    baselines = {n: b for n, b in measured.items() if n.startswith(BASELINE_PREFIX)}
    if baselines and PROXY in measured:
        out[PROXY]["vs_baseline"] = {n: compare(measured[PROXY], b)
                                     for n, b in baselines.items()}
    return out


def run_rounds(runner: Runner, targets: Sequence[Target], sc: Scenario,
               s: Settings) -> tuple[dict[str, Any], dict[str, Measured]]:
    measured = alternate(runner, targets, sc.load, s, sc.name)
    entry: dict[str, Any] = {
        "name": sc.name, "kind": "rounds", "description": sc.description,
        "model": sc.load.model, "stream": sc.load.stream, "concurrency": sc.load.concurrency,
        "rate": sc.load.rate, "open_streams": sc.open_streams,
        "rounds": s.rounds, "duration_s": sc.load.duration,
        "targets": {n: target_figures(m, sc.load, s, sc.open_streams)
                    for n, m in measured.items()},
        "comparisons": comparisons(measured),
        "plot": list(sc.plot),
    }
    for n, m in measured.items():  # sparse, so the CDFs can be drawn again from the JSON
        entry["targets"][n]["histograms"] = {h: m.histogram(h).to_json() for h in sc.plot}
    return entry, measured


def rounds_estimate(sc: Scenario, s: Settings, targets: int) -> float:
    warm = dataclasses.replace(sc.load, duration=s.warmup).estimate() if s.warmup > 0 else 0
    return targets * (warm + s.rounds * sc.load.estimate())


def _rate_passes(m: Measured, direct: Measured | None) -> tuple[bool, float | None]:
    """(clean at this rate, added p99 ms): no errors, and p99 within budget of direct's."""
    mine = m.summary("latency")
    if m.errors() or not mine or m.ok == 0:
        return False, None
    if direct is None:  # direct itself: its own p99 is what it adds over nothing
        return mine["p99"] < ADDED_P99_BUDGET_MS, mine["p99"]
    theirs = direct.summary("latency")
    if not theirs:
        return False, None
    added = round(mine["p99"] - theirs["p99"], 3)
    return added < ADDED_P99_BUDGET_MS, added


def run_sweep(runner: Runner, targets: Sequence[Target], s: Settings) -> dict[str, Any]:
    """Open loop at ascending rates, targets alternating at each rate; a target leaves
    the sweep after failing two rates in a row, and everyone stops when direct does
    (beyond that the load side, not the target, is what is measured)."""
    per_rate_est = Load("mock", False, s.duration, rate=1).estimate()
    if s.warmup > 0:
        for t in targets:
            runner.run(t, Load("mock", False, s.warmup, rate=s.sweep_rates[0]),
                       f"sweep: warm-up, {t.name}")
    rows: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    fails = {t.name: 0 for t in targets}
    active = list(targets)
    for i, rate in enumerate(s.sweep_rates):
        measured: dict[str, Measured] = {}
        direct_ok = True
        for t in active:
            m = measured[t.name] = Measured()
            m.add(runner.run(t, Load("mock", False, s.duration, rate=rate),
                             f"sweep: {rate:g}/s ({i + 1}/{len(s.sweep_rates)}), {t.name}"))
            ok, added = _rate_passes(m, None if t.name == DIRECT else measured.get(DIRECT))
            if t.name == DIRECT:
                direct_ok = ok
            # When direct is over budget the load side is the limit: not the target's pass.
            ok = ok and direct_ok
            fails[t.name] = 0 if ok else fails[t.name] + 1
            lat = m.summary("latency")
            rows[t.name].append({
                "rate": rate, "sent": m.sent, "ok": m.ok, "rps": round(m.rps, 2),
                "errors": m.errors(), "p50_ms": lat["p50"] if lat else None,
                "p99_ms": lat["p99"] if lat else None, "added_p99_ms": added,
                "cpu_s": m.target_cpu_s(), "pass": ok, "load_side_ok": direct_ok,
            })
        before = len(active)
        active = [] if fails.get(DIRECT, 0) >= 2 else [t for t in active if fails[t.name] < 2]
        runner.progress.skip((before - len(active)) * per_rate_est
                             * (len(s.sweep_rates) - i - 1))
        if not active:
            break
    best = {n: max((r["rate"] for r in rs if r["pass"]), default=None) for n, rs in rows.items()}
    return {"name": "sweep", "kind": "sweep", "model": "mock", "duration_s": s.duration,
            "description": "open loop at ascending rates, latency counted from each "
                           "request's due time",
            "rates": list(s.sweep_rates), "budget_added_p99_ms": ADDED_P99_BUDGET_MS,
            "targets": rows, "best_rate": best}


def run_workers(runner: Runner, w1: Target, w2: Target, s: Settings) -> dict[str, Any]:
    load = Load("mock", False, s.duration, s.concurrency)
    measured = alternate(runner, [w1, w2], load, s, "workers")
    figures = {n: target_figures(m, load, s) for n, m in measured.items()}
    one, two = measured[w1.name].rps, measured[w2.name].rps
    return {
        "name": "workers", "kind": "workers", "model": "mock", "concurrency": s.concurrency,
        "description": f"our proxy, 1 worker vs 2, non-stream at concurrency {s.concurrency}",
        "rounds": s.rounds, "duration_s": s.duration,
        "workers": {w1.name: {"workers": 1, "cpus": w1.cpus},
                    w2.name: {"workers": 2, "cpus": w2.cpus}},
        "targets": figures,
        "scaling": round(two / one, 3) if one else None,
        # Close to 1.0 means the load side used all its CPU: then it, not the proxy, set
        # the ceiling for workers = 2.
        "load_cpu_share_w2": figures[w2.name]["load_cpu_share"],
    }


def soak_growth(series: list[tuple[float, float]], window: float) -> float | None:
    """(mean RSS over the last ``window`` s − RSS at the end of the first ``window`` s) /
    the latter, in %."""
    if not series:
        return None
    end = series[-1][0]
    first = [rss for t, rss in series if t <= window]
    last = [rss for t, rss in series if t >= end - window]
    if not first or not last or end < 2 * window:
        return None
    return round((sum(last) / len(last) - first[-1]) / first[-1] * 100, 3)


def run_soak(runner: Runner, proxy: Target, rate: float, s: Settings) -> dict[str, Any]:
    duration = s.soak_minutes * 60
    # A minute either end, as the issue defines it; shorter soaks use a quarter each.
    window = min(60.0, duration / 4)
    load = Load("mock", False, duration, rate=rate)
    run = runner.run(proxy, load, f"soak: {s.soak_minutes:g} min at {rate:g}/s, {proxy.name}",
                     sample_every=min(5.0, max(duration / 40, 0.1)))
    series = run.target_track.series() if run.target_track else []
    return {
        "name": "soak", "kind": "soak", "model": "mock", "rate": rate,
        "description": f"{proxy.name}, open loop at {rate:g}/s for {s.soak_minutes:g} min",
        "minutes": s.soak_minutes, "window_s": window, "target": proxy.name,
        "figures": target_figures(Measured([run]), load, s),
        "rss_series_mb": series, "rss_growth_pct": soak_growth(series, window),
    }


_SECRET_HEADERS = ("authorization:", "x-api-key:", "x-goog-api-key:")


def redacted(argv: list[str]) -> list[str]:
    """A command line fit for a report: API keys (ours or a target's) blanked out."""
    out = list(argv)
    for i in range(1, len(out)):
        if out[i - 1] == "--header" and out[i].lower().startswith(_SECRET_HEADERS):
            out[i] = out[i].split(":", 1)[0] + ": <redacted>"
        elif out[i - 1] == "--target-key" and "=" in out[i]:
            out[i] = out[i].split("=", 1)[0] + "=<redacted>"
        elif out[i].startswith("--target-key="):
            out[i] = "--target-key=<redacted>"
    return out
