"""The suite's PNG plots, drawn from the report dictionary alone (so a saved
``report.json`` can be drawn again): latency CDFs per scenario, one line per target;
the sweep's throughput and p99 against the offered rate; the soak's RSS over time.

Uses matplotlib's object API (``Figure``), never ``pyplot``: no global figure state,
no GUI backend. Must not import ``proxy`` or ``control_plane``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from benchmarks.histogram import Histogram

_TITLES = {"latency": "latency", "ttft": "time to first token", "gap": "inter-chunk gap",
           "total": "full stream time"}


def _plain_log_labels(ax: Axes, axis: str) -> None:
    """"20" and "200" rather than 2×10¹ on a log axis: milliseconds are read, not powers."""
    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(plain)
    target.set_minor_formatter(plain)


def _cdf_plot(sc: dict[str, Any], path: Path) -> bool:
    names = sc.get("plot", [])
    fig = Figure(figsize=(6.5 * max(len(names), 1), 4.5), layout="constrained")
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    drew = False
    for ax, h in zip(axes, names, strict=False):
        for target, t in sc["targets"].items():
            data = t.get("histograms", {}).get(h)
            if not data:
                continue
            hist = Histogram.from_json(data)
            if not hist.count:
                continue
            # From (min, 0): a target whose every value fell in one bucket is still a line.
            points = [(hist.min(), 0.0), *hist.cdf(points=200)]
            ax.plot([s * 1000 for s, _ in points], [f for _, f in points], label=target)
            drew = True
        ax.set_xscale("log")
        _plain_log_labels(ax, "x")
        ax.set_xlabel(f"{_TITLES.get(h, h)} (ms, log)")
        ax.set_ylabel("fraction of requests ≤ x")
        ax.set_title(f"{sc['name']}: {_TITLES.get(h, h)}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    if drew:
        fig.savefig(path, dpi=100)
    return drew


def _sweep_plot(sc: dict[str, Any], path: Path) -> bool:
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    rps_ax, p99_ax = fig.subplots(1, 2)
    for target, rows in sc["targets"].items():
        rates = [r["rate"] for r in rows]
        rps_ax.plot(rates, [r["rps"] for r in rows], marker="o", label=target)
        p99 = [(r["rate"], r["p99_ms"]) for r in rows if r["p99_ms"] is not None]
        p99_ax.plot([x for x, _ in p99], [y for _, y in p99], marker="o", label=target)
    top = max(sc["rates"])
    rps_ax.plot([0, top], [0, top], linestyle=":", color="grey", label="offered")
    rps_ax.set(xlabel="offered rate (requests/s)", ylabel="answered (requests/s)",
               title="throughput vs offered rate")
    p99_ax.set_yscale("log")
    _plain_log_labels(p99_ax, "y")
    p99_ax.set(xlabel="offered rate (requests/s)", ylabel="p99 latency (ms, log)",
               title="p99 latency vs offered rate")
    for ax in (rps_ax, p99_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)
    return True


def _soak_plot(sc: dict[str, Any], path: Path) -> bool:
    series = sc["rss_series_mb"]
    if not series:
        return False
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([t / 60 for t, _ in series], [rss for _, rss in series], marker=".")
    ax.set(xlabel="minutes", ylabel="RSS of the proxy's processes (MiB)",
           title=f"soak: {sc['target']} at {sc['rate']:g} requests/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def draw(report: dict[str, Any], folder: Path) -> list[str]:
    """Every plot the report has data for; returns the file names written."""
    written = []
    for sc in report["scenarios"]:
        kind, path = sc["kind"], folder / f"{sc['name']}.png"
        if kind == "rounds":
            path = folder / f"cdf-{sc['name']}.png"
            drew = _cdf_plot(sc, path)
        elif kind == "sweep":
            drew = _sweep_plot(sc, path)
        elif kind == "soak":
            path = folder / "soak-rss.png"
            drew = _soak_plot(sc, path)
        else:
            drew = False
        if drew:
            written.append(path.name)
    return written
