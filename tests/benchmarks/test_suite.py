"""Smoke test of ``make bench``: the whole suite runs end to end with tiny settings.

One run of ``python -m benchmarks --quick`` (every scenario, a 6-second soak) shared by
every test here. No wall-clock thresholds: only what a user of the suite would notice
if it broke — a target not measured or measured with errors, a missing file or figure,
our proxy not emitting one event per request or running degraded admission, keys left
in Redis, servers left running.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from benchmarks.measure import model_shape
from tests.support import ROOT, wait_until_gone

TARGETS = ["direct", "passthrough", "proxy"]
RATIO_ROUNDING = 0.0006  # ratios are written with 3 decimals
CLOSED = ["nonstream", "stream", "latency", "latency-stream", "paced", "paced-capacity"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[
        tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]]:
    folder = tmp_path_factory.mktemp("bench") / "results"
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--duration", "0.5",
            "--warmup", "0", "--concurrency", "4", "--paced-streams", "50",
            "--paced-model", "mock-ttft50-chunks10-delay20", "--capacity-streams", "100",
            "--capacity-model", "mock-ttft50-chunks5-delay50",
            "--sweep-rates", "100,200", "--soak-minutes", "0.1", "--output-dir", str(folder)]
    result = subprocess.run(argv, cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
                            capture_output=True, text=True, timeout=110, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    yield result, orjson.loads((folder / "report.json").read_bytes()), folder


def _scenario(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in report["scenarios"] if s["name"] == name)


def test_every_target_is_measured_without_errors(suite: Any) -> None:
    _, report, _ = suite
    assert [s["name"] for s in report["scenarios"]] == [
        *CLOSED, "sweep", "workers", "soak"]
    for name in CLOSED:
        targets = _scenario(report, name)["targets"]
        assert list(targets) == TARGETS, name
        for target, figures in targets.items():
            assert figures["ok"] > 0 and figures["errors"] == {}, (name, target, figures)
    sweep = _scenario(report, "sweep")
    for target in TARGETS:
        assert [row["rate"] for row in sweep["targets"][target]] == [100, 200]
        assert all(row["ok"] > 0 and row["errors"] == {} for row in sweep["targets"][target])
    workers = _scenario(report, "workers")
    assert list(workers["targets"]) == ["proxy", "proxy-w2"]
    assert all(t["ok"] > 0 and t["errors"] == {} for t in workers["targets"].values())
    soak = _scenario(report, "soak")
    assert soak["figures"]["ok"] > 0 and soak["figures"]["errors"] == {}
    assert len(soak["rss_series_mb"]) >= 2


def _section(markdown: str, name: str) -> str:
    """One scenario's part of report.md, from its heading to the next."""
    return markdown.split(f"\n## {name}", 1)[1].split("\n## ", 1)[0]


def test_comparisons_are_reported_and_agree_with_the_raw_figures(suite: Any) -> None:
    # The machine's speed is not asserted (a busy machine is slow): what a reader of the
    # report relies on is that every figure is there and follows from the raw ones.
    _, report, folder = suite
    markdown = (folder / "report.md").read_text()
    for name in CLOSED:
        sc = _scenario(report, name)
        t, c = sc["targets"], sc["comparisons"]
        assert set(c) == set(TARGETS) - {"direct"}, name
        for target in c:
            assert c[target]["vs_direct"]["rps_ratio"] == pytest.approx(
                t[target]["rps"] / t["direct"]["rps"], rel=0.01, abs=RATIO_ROUNDING), (name, target)
        per_core = c["proxy"]["vs_passthrough"]["rps_per_core_ratio"]
        assert per_core == pytest.approx(
            t["proxy"]["rps_per_core"] / t["passthrough"]["rps_per_core"], rel=0.01,
            abs=RATIO_ROUNDING), name
        cost = "cpu_us_per_chunk" if sc["stream"] else "cpu_us_per_request"
        chunks = model_shape(sc["model"])[1] if sc["stream"] else 1
        for target in ("passthrough", "proxy"):
            assert t[target][cost] == pytest.approx(
                t[target]["cpu_s"] * 1e6 / (t[target]["ok"] * chunks), rel=0.01), name
        h = "gap" if name.startswith("paced") else "ttft" if sc["stream"] else "latency"
        added = c["proxy"]["vs_direct"]["added_ms"][h]
        assert added["p99"] == pytest.approx(
            t["proxy"]["summary_ms"][h]["p99"] - t["direct"]["summary_ms"][h]["p99"],
            abs=0.002), name
        table = _section(markdown, name)
        for target in TARGETS:
            assert f"| {target} | {t[target]['rps']:,.0f} |" in table, (name, target)
        assert f"| {per_core:.2f}× |" in table, name
    sweep = _scenario(report, "sweep")
    budget = sweep["budget_added_p99_ms"]
    direct = {row["rate"]: row for row in sweep["targets"]["direct"]}
    for target, rows in sweep["targets"].items():
        for row in rows:
            if target != "direct" and row["added_p99_ms"] is not None:
                assert row["added_p99_ms"] == pytest.approx(
                    row["p99_ms"] - direct[row["rate"]]["p99_ms"], abs=0.002)
            clean = not row["errors"] and row["added_p99_ms"] is not None \
                and row["added_p99_ms"] < budget
            assert row["pass"] == (clean and row["load_side_ok"]), (target, row)
        best = max((row["rate"] for row in rows if row["pass"]), default=None)
        assert sweep["best_rate"][target] == best, target
        # "None met the budget" is an answer, and the report gives it as such.
        said = f"{target}: none met it" if best is None else f"{target}: {best:,.0f}/s"
        assert said in _section(markdown, "sweep"), target
    assert _scenario(report, "latency-stream")["targets"]["proxy"]["cpu_us_per_chunk"] > 0
    assert _scenario(report, "paced")["targets"]["proxy"]["rss_peak_mb"] > 0
    workers = _scenario(report, "workers")
    w1, w2 = (workers["targets"][n]["rps"] for n in ("proxy", "proxy-w2"))
    assert workers["scaling"] == pytest.approx(w2 / w1, rel=0.01, abs=RATIO_ROUNDING)
    assert _scenario(report, "soak")["rss_growth_pct"] is not None
    rows = report["issue_targets"]
    assert len(rows) == 6 and all(row["met"] != "not measured" for row in rows)
    for row in rows:
        assert f"| {row['what']} | {row['measured']} |" in markdown


def test_files_are_written(suite: Any) -> None:
    result, report, folder = suite
    markdown = (folder / "report.md").read_text()
    assert "## Targets from issue 6" in markdown and "| proxy |" in markdown
    assert markdown in result.stdout
    expected = {*(f"cdf-{name}.png" for name in CLOSED), "sweep.png", "soak-rss.png"}
    assert set(report["plots"]) == expected
    for name in expected:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert report["machine"]["cpu_count"] > 0 and report["machine"]["packages"]["aiohttp"]
    assert report["processes"]["proxy"]["argv"][1:3] == ["-m", "proxy"]
    # Reports get shared: the API key the suite issued (or a target's) is not in them.
    for text in ((folder / "report.json").read_text(), markdown):
        assert "qnp_" not in text and "Bearer <redacted>" not in text
    assert "Authorization: <redacted>" in (folder / "report.json").read_text()


def test_our_proxies_emit_one_event_per_request_and_admit_normally(suite: Any) -> None:
    _, report, _ = suite
    proxies = report["proxies"]
    assert set(proxies) == {"proxy", "proxy-w2"}
    for name, proxy in proxies.items():
        assert proxy["events_emitted"] == proxy["requests"] > 0, name
        # Admission found the published account state and Redis answered in time: it
        # never fell back to the degraded local policy.
        assert proxy["unpublished_state_warnings"] == 0, proxy["log_head"]
        assert proxy["degraded_admission_errors"] == 0, proxy["log_head"]


def test_nothing_is_left_behind(suite: Any, redis_url: str) -> None:
    _, report, _ = suite
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"{report['redis']['prefix']}:*")) == []
    finally:
        client.close()
    for name, process in report["processes"].items():
        assert wait_until_gone(process["pid"], timeout=5), name
