"""report.md from a saved report: answers the run gave are written as given, "none met"
included (a busy machine's sweep may find no rate within budget, and the reader must
see that said, not a dash that reads like a missing figure)."""

from __future__ import annotations

from typing import Any

from benchmarks import report


def _sweep_row(rate: float, passed: bool) -> dict[str, Any]:
    return {"rate": rate, "sent": 100, "ok": 100, "rps": rate, "errors": {},
            "p50_ms": 1.0, "p99_ms": 9.0, "added_p99_ms": 7.5 if not passed else 1.0,
            "cpu_s": 0.1, "pass": passed, "load_side_ok": True}


def _report(best: dict[str, float | None]) -> dict[str, Any]:
    rates = [100.0, 200.0]
    return {
        "started_at": "2026-12-01T00:00:00+00:00", "command": ["python", "-m", "benchmarks"],
        "machine": {"git_commit": "abc", "cpu_model": "cpu", "cpu_count": 2,
                    "kernel": "Linux", "python": "3.11"},
        "settings": {"rounds": 1, "duration_s": 1.0, "warmup_s": 0.0},
        "pinning": {"proxy": "0", "load": "1", "note": "pinned"},
        "issue_targets": [], "proxies": {},
        "scenarios": [{"name": "sweep", "kind": "sweep", "rates": rates,
                       "budget_added_p99_ms": 5.0, "best_rate": best,
                       "targets": {n: [_sweep_row(r, v is not None and r <= v) for r in rates]
                                   for n, v in best.items()}}],
    }


def test_a_sweep_where_no_rate_met_the_budget_says_so() -> None:
    markdown = report.render(_report({"direct": 200.0, "proxy": None}))
    assert "direct: 200/s, proxy: none met it." in markdown
    assert "–/s" not in markdown
