"""The suite's report: the performance targets of issue 6 judged against what one run
measured, our proxy against each baseline commit (issue 10's "hardening costs at most
3 % of non-stream requests per core"), and the markdown tables of ``report.md``.

Owns: reading the report dictionary (what ``report.json`` holds) and nothing else, so
a saved report can be rendered again. Must not import ``proxy`` or ``control_plane``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.stack import DIRECT, PASSTHROUGH, PROXY, PROXY_SENTRY, PROXY_TLS

DASH = "–"
BASELINE_BAR = 0.97  # rps per core against the baseline: at most 3 % dearer


def _get(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _scenario(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((s for s in report["scenarios"] if s["name"] == name), None)


def _row(what: str, measured: str, target: str, met: str, note: str = "") -> dict[str, str]:
    return {"what": what, "measured": measured, "target": target, "met": met, "note": note}


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def issue_targets(report: dict[str, Any]) -> list[dict[str, str]]:
    """Each performance target of issue 6 that this run measured (else "not measured")."""
    rows = []
    pinned = report["pinning"]["proxy"] is not None
    caveat = "" if pinned else "not pinned"
    ratio = _get(_scenario(report, "nonstream"), "comparisons", PROXY, "vs_passthrough",
                 "rps_per_core_ratio")
    rows.append(_row(
        "non-stream rps per core, proxy / passthrough",
        DASH if ratio is None else f"{ratio:.2f}×", "≥ 0.6× first bar, ≥ 1.0× goal",
        "not measured" if ratio is None else
        ("goal" if ratio >= 1.0 else "first bar" if ratio >= 0.6 else "NO"), caveat))
    added = _get(_scenario(report, "latency-stream"), "comparisons", PROXY, "vs_direct",
                 "added_ms", "ttft")
    for q, bar in (("p50", 0.5), ("p99", 1.0)):
        value = None if added is None else added[q]
        rows.append(_row(f"added TTFT at concurrency 1, {q}",
                         DASH if value is None else f"{value:+.3f} ms", f"≤ {bar} ms",
                         "not measured" if value is None else _yes(value <= bar), caveat))
    soak = _scenario(report, "soak")
    growth = _get(soak, "rss_growth_pct")
    short = soak is not None and soak["minutes"] < 10
    rows.append(_row("RSS growth over the soak",
                     DASH if growth is None else f"{growth:+.2f} %", "≤ 5 % over 10 min",
                     "not measured" if growth is None else _yes(growth <= 5),
                     f"soak was {soak['minutes']:g} min" if short and soak else ""))
    cap = _scenario(report, "paced-capacity")
    gap = _get(cap, "comparisons", PROXY, "vs_direct", "added_ms", "gap", "p99")
    if cap is None or gap is None:
        rows.append(_row("paced streams per worker, added gap p99", DASH,
                         "≥ 5,000 streams, ≤ 2 ms", "not measured"))
    else:
        streams = cap["open_streams"]
        errors = _get(cap, "targets", PROXY, "errors") or {}
        ok = gap <= 2.0 and not errors
        rows.append(_row("paced streams per worker, added gap p99",
                         f"{streams:,} streams, {gap:+.3f} ms", "≥ 5,000 streams, ≤ 2 ms",
                         _yes(ok) if streams >= 5000 else "fewer streams",
                         f"errors: {errors}" if errors else caveat))
    workers = _scenario(report, "workers")
    scaling = _get(workers, "scaling")
    share = _get(workers, "load_cpu_share_w2")
    note, met = "", "not measured" if scaling is None else _yes(scaling >= 1.6)
    if share is not None:
        note = f"load side used {share:.0%} of its CPU"
    # With 2 workers the second one shares the load side's CPUs: if they were saturated,
    # the load side, not the proxy, set the ceiling and the target is not measurable here.
    busy = _get(workers, "targets", f"{PROXY}-w2", "cpu_busy") or []
    load = [int(c) for c in (report["pinning"]["load"] or "").split(",") if c]
    hot = max((busy[c] for c in load if c < len(busy)), default=0.0)
    if scaling is not None and scaling < 1.6 and hot >= 0.95:
        met, note = "load-bound", f"{note}; its CPU was {hot:.0%} busy with 2 workers"
    rows.append(_row("workers = 2 scaling", DASH if scaling is None else f"{scaling:.2f}×",
                     "≥ 1.6×", met, note))
    return rows


def baseline_verdict(ratio: float, by_round: list[float]) -> str:
    """yes / NO only when every round agrees with the whole run; rounds on both sides
    of the bar mean the machine's noise is larger than what is being judged."""
    if ratio >= BASELINE_BAR and min(by_round) >= BASELINE_BAR:
        return "yes"
    if ratio < BASELINE_BAR and max(by_round) < BASELINE_BAR:
        return "NO"
    return "unclear: rounds on both sides"


def baseline_targets(report: dict[str, Any]) -> list[dict[str, str]]:
    """Per baseline: our proxy's non-stream rps per core over the baseline's, same run."""
    rows = []
    sc = _scenario(report, "nonstream")
    for name in report.get("baselines") or {}:
        c = _get(sc, "comparisons", PROXY, "vs_baseline", name)
        ratio = _get(c, "rps_per_core_ratio")
        what = f"non-stream rps per core, {PROXY} / {name}"
        target = f"≥ {BASELINE_BAR:.2f}× (costs ≤ {1 - BASELINE_BAR:.0%})"
        if sc is None or ratio is None:
            rows.append(_row(what, DASH, target, "not measured"))
            continue
        ours, theirs = (_get(sc, "targets", n, "cpu_us_per_request") for n in (PROXY, name))
        by_round = c["rps_per_core_ratio_by_round"] or [ratio]
        spread = f"; rounds {min(by_round):.3f}–{max(by_round):.3f}×"
        rows.append(_row(what, f"{ratio:.3f}×", target, baseline_verdict(ratio, by_round),
                         f"CPU µs/req {_num(ours, ',.1f')} vs {_num(theirs, ',.1f')}"
                         f"{spread}"))
    return rows


def tls_cost(report: dict[str, Any], variant: str = PROXY_TLS) -> list[list[str]]:
    """Per scenario measured with ``--with-tls`` (or ``--with-sentry``: ``variant``): that
    proxy against the plain one, same run (rps per core, CPU per request, added latency;
    p50 and p99)."""
    rows = []
    for sc in report["scenarios"]:
        c = _get(sc, "comparisons", variant, "vs_plain")
        if sc.get("kind") != "rounds" or c is None:
            continue
        h = "gap" if sc["name"].startswith("paced") else "ttft" if sc["stream"] else "latency"
        unit = "cpu_us_per_chunk" if sc["stream"] else "cpu_us_per_request"
        plain, tls = (_get(sc, "targets", n, unit) for n in (PROXY, variant))
        added = _get(c, "added_ms", h) or {}
        by_round = c["rps_per_core_ratio_by_round"]
        rows.append([sc["name"], _ratio(c["rps_per_core_ratio"]),
                     f"{min(by_round):.3f}–{max(by_round):.3f}×" if by_round else DASH,
                     f"{_num(plain, ',.1f')} → {_num(tls, ',.1f')}",
                     f"{_signed(added.get('p50'))} / {_signed(added.get('p99'))} ({h})"])
    return rows


def _ms(v: Any) -> str:
    return DASH if v is None else f"{v:.2f}"


def _signed(v: Any) -> str:
    return DASH if v is None else f"{v:+.2f}"


def _num(v: Any, fmt: str = ",.0f") -> str:
    return DASH if v is None else format(v, fmt)


def _ratio(v: Any) -> str:
    return DASH if v is None else f"{v:.2f}×"


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _rounds_table(sc: dict[str, Any]) -> list[str]:
    paced = sc["name"].startswith("paced")
    h = "gap" if paced else "ttft" if sc["stream"] else "latency"
    head = ["target", "rps", f"{h} p50 ms", f"{h} p99 ms", "added p50", "added p99",
            "× direct rps", "CPU µs/" + ("chunk" if sc["stream"] else "req"), "rps/core",
            "rps/core × passthrough", "errors"]
    if paced:
        head[1] = "streams/s"
        head += ["RSS peak MB", "KB/open stream"]
    baselines = any("vs_baseline" in c for c in sc["comparisons"].values())
    if baselines:
        head += ["rps/core × baseline", "CPU/req × baseline"]
    rows = []
    for name, t in sc["targets"].items():
        c = sc["comparisons"].get(name, {})
        s = t["summary_ms"].get(h) or {}
        added = _get(c, "vs_direct", "added_ms", h) or {}
        row = [name, _num(t["rps"]), _ms(s.get("p50")), _ms(s.get("p99")),
               _signed(added.get("p50")), _signed(added.get("p99")),
               _ratio(_get(c, "vs_direct", "rps_ratio")),
               _num(t["cpu_us_per_chunk" if sc["stream"] else "cpu_us_per_request"], ",.1f"),
               _num(t["rps_per_core"]),
               _ratio(_get(c, "vs_passthrough", "rps_per_core_ratio")), _errors(t["errors"])]
        if paced:
            row += [_num(t.get("rss_peak_mb"), ".1f"), _num(t.get("rss_per_open_stream_kb"),
                                                            ".1f")]
        if baselines:
            vs = c.get("vs_baseline") or {}
            row += [", ".join(f"{_ratio(v['rps_per_core_ratio'])} {b}" for b, v in vs.items())
                    or DASH,
                    ", ".join(f"{_ratio(v['cpu_per_request_ratio'])} {b}"
                              for b, v in vs.items()) or DASH]
        rows.append(row)
    return _table(head, rows)


def _sweep_table(sc: dict[str, Any]) -> list[str]:
    names = list(sc["targets"])
    rows = []
    for rate in sc["rates"]:
        row = [f"{rate:,.0f}"]
        for n in names:
            r = next((r for r in sc["targets"][n] if r["rate"] == rate), None)
            if r is None:
                row.append(DASH)
                continue
            added = "" if n == DIRECT else f" ({_signed(r['added_p99_ms'])})"
            mark = "✓" if r["pass"] else "✗"
            errs = "" if not r["errors"] else f", {sum(r['errors'].values())} err"
            row.append(f"{mark} {r['rps']:,.0f}/s, p99 {_ms(r['p99_ms'])}{added}{errs}")
        rows.append(row)
    best = ", ".join(f"{n}: none met it" if v is None else f"{n}: {_num(v)}/s"
                     for n, v in sc["best_rate"].items())
    return [*_table(["offered rate/s", *names], rows), "",
            f"Highest clean rate (no errors, added p99 < {sc['budget_added_p99_ms']:g} ms, "
            f"load side within budget): {best}."]


def _workers_table(sc: dict[str, Any]) -> list[str]:
    rows = [[n, str(sc["workers"][n]["workers"]), sc["workers"][n]["cpus"] or "not pinned",
             _num(t["rps"]), _ms(_get(t, "summary_ms", "latency", "p99")),
             DASH if t["load_cpu_share"] is None else f"{t['load_cpu_share']:.0%}",
             _busy(t["cpu_busy"]), _errors(t["errors"])] for n, t in sc["targets"].items()]
    return [*_table(["target", "workers", "CPUs", "rps", "p99 ms", "load side CPU",
                     "CPUs busy", "errors"], rows), "",
            f"Scaling workers 2 / 1: {_ratio(sc['scaling'])}. \"Load side CPU\" is what "
            "the mock, Redis and the load generator used of their CPUs; near 100 % they, "
            "not the proxy, set the ceiling."]


def _busy(shares: list[float]) -> str:
    return ", ".join(f"{cpu}: {share:.0%}" for cpu, share in enumerate(shares)) or DASH


def _soak_table(sc: dict[str, Any]) -> list[str]:
    f, series = sc["figures"], sc["rss_series_mb"]
    lat = f["summary_ms"]["latency"] or {}
    return _table(
        ["target", "rate/s", "minutes", "ok", "errors", "p50 ms", "p99 ms", "RSS first MB",
         "RSS last MB", "growth"],
        [[sc["target"], _num(sc["rate"]), f"{sc['minutes']:g}", _num(f["ok"]),
          _errors(f["errors"]), _ms(lat.get("p50")), _ms(lat.get("p99")),
          _num(series[0][1] if series else None, ".1f"),
          _num(series[-1][1] if series else None, ".1f"),
          DASH if sc["rss_growth_pct"] is None else f"{sc['rss_growth_pct']:+.2f} %"]])


def render(report: dict[str, Any]) -> str:
    m, st = report["machine"], report["settings"]
    lines = [
        f"# QNP benchmark suite, {report['started_at']}", "",
        f"Commit {m['git_commit'] or 'unknown'}; {m['cpu_model']}, {m['cpu_count']} CPUs; "
        f"{m['kernel']}; Python {m['python']}. Pinning: {report['pinning']['note']}.",
        f"Rounds: {st['rounds']} × {st['duration_s']:g} s per target, alternating, after a "
        f"{st['warmup_s']:g} s warm-up. Command: `{' '.join(report['command'])}`", "",
        "Figures to compare are the ratios and the *added* milliseconds (target minus "
        f"`{DIRECT}`, measured in the same run); `{PASSTHROUGH}` is the bare aiohttp "
        "passthrough, the bar for rps per core.", "",
        "## Targets from issue 6", "",
        *_table(["what", "measured", "target", "met?", "note"],
                [[r["what"], r["measured"], r["target"], r["met"], r["note"]]
                 for r in report["issue_targets"]]),
    ]
    if report.get("baseline_targets"):
        commits = ", ".join(f"`{n}` is {b['commit'][:12]}"
                            for n, b in report["baselines"].items())
        lines += ["", "## Against the baseline", "",
                  f"Our proxy and the same proxy as another commit built it ({commits}), "
                  "same catalog, key and pinning, rounds alternating in this run.", "",
                  *_table(["what", "measured", "target", "met?", "note"],
                          [[r["what"], r["measured"], r["target"], r["met"], r["note"]]
                           for r in report["baseline_targets"]])]
    if tls := tls_cost(report):
        lines += ["", "## What TLS costs", "",
                  f"`{PROXY_TLS}` is `{PROXY}` serving HTTPS itself (TLS 1.3, ECDSA P-256, "
                  "keep-alive connections: one handshake per connection), rounds alternating "
                  "in this run.", "",
                  *_table(["scenario", "rps/core, tls / plain", "rounds",
                           "CPU µs per request (chunk)", "added ms p50 / p99"], tls)]
    if sentry := tls_cost(report, PROXY_SENTRY):
        lines += ["", "## What Sentry costs", "",
                  f"`{PROXY_SENTRY}` is `{PROXY}` with SENTRY_DSN set (the SDK initialised, "
                  "reporting to a local sink), rounds alternating in this run.", "",
                  *_table(["scenario", "rps/core, sentry / plain", "rounds",
                           "CPU µs per request (chunk)", "added ms p50 / p99"], sentry)]
    for sc in report["scenarios"]:
        title = sc.get("description", "")
        lines += ["", f"## {sc['name']}" + (f": {title}" if title else ""), ""]
        if sc["kind"] == "rounds":
            lines += _rounds_table(sc)
        elif sc["kind"] == "sweep":
            lines += _sweep_table(sc)
        elif sc["kind"] == "workers":
            lines += _workers_table(sc)
        elif sc["kind"] == "soak":
            lines += _soak_table(sc)
    lines += ["", "## Our proxies", "", *_table(
        ["proxy", "requests", "events emitted", "one event per request?",
         "no-published-state warnings", "degraded admission", "log lines"],
        [[n, _num(p["requests"]), _num(p["events_emitted"]),
          _yes(p["requests"] == p["events_emitted"]), str(p["unpublished_state_warnings"]),
          str(p["degraded_admission_errors"]), str(p["log_lines"])]
         for n, p in report["proxies"].items()]),
        "", "Our proxies log at WARNING, so any log line is worth a look: the first few "
        "are in `report.json` (`proxies.<name>.log_head`)."]
    if report.get("plots"):
        lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"])]
    return "\n".join(lines) + "\n"
