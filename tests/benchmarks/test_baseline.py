"""``python -m benchmarks --baseline REF``: our proxy as another commit built it, measured
in the same run, and the report's before/after figures. One quick non-stream run
against HEAD; the speed is not asserted (a busy machine is slow), only that the
baseline was really measured and every ratio follows from the raw figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from benchmarks.report import baseline_verdict
from tests.support import ROOT

BASELINE = "proxy@HEAD"


def _bench(args: list[str], redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT,
                          env={**os.environ, "REDIS_URL": redis_url}, capture_output=True,
                          text=True, timeout=110, check=False)


def _head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_a_baseline_commit_is_measured_next_to_our_proxy(tmp_path: Path,
                                                         redis_url: str) -> None:
    folder = tmp_path / "results"
    result = _bench(["--quick", "--scenarios", "nonstream", "--duration", "0.5",
                     "--warmup", "0", "--concurrency", "4", "--baseline", "HEAD",
                     "--output-dir", str(folder)], redis_url)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report: dict[str, Any] = orjson.loads((folder / "report.json").read_bytes())
    markdown = (folder / "report.md").read_text()

    assert report["baselines"] == {BASELINE: {"ref": "HEAD", "commit": _head()}}
    assert report["targets"][BASELINE]["role"] == "baseline"
    # It ran from its own exported tree, which went with the run's temporary folder.
    cwd = Path(report["processes"][BASELINE]["cwd"])
    assert cwd != ROOT and not cwd.exists()
    assert report["processes"][BASELINE]["cpus"] == report["processes"]["proxy"]["cpus"]
    proxies = report["proxies"]
    assert proxies[BASELINE]["events_emitted"] == proxies[BASELINE]["requests"] > 0

    [sc] = report["scenarios"]
    t = sc["targets"]
    assert list(t) == ["direct", "passthrough", "proxy", BASELINE]
    assert t[BASELINE]["ok"] > 0 and t[BASELINE]["errors"] == {}
    vs = sc["comparisons"]["proxy"]["vs_baseline"][BASELINE]
    ratio = vs["rps_per_core_ratio"]
    assert ratio == pytest.approx(t["proxy"]["rps_per_core"] / t[BASELINE]["rps_per_core"],
                                  rel=0.01, abs=0.0006)
    assert vs["cpu_per_request_ratio"] == pytest.approx(
        t["proxy"]["cpu_us_per_request"] / t[BASELINE]["cpu_us_per_request"],
        rel=0.01, abs=0.0006)
    assert len(vs["rps_per_core_ratio_by_round"]) == sc["rounds"] == 1

    [row] = report["baseline_targets"]
    assert row["what"] == f"non-stream rps per core, proxy / {BASELINE}"
    assert row["measured"] == f"{ratio:.3f}×"
    assert row["met"] == ("yes" if ratio >= 0.97 else "NO")  # one round: it agrees
    assert "## Against the baseline" in markdown
    assert f"| {row['what']} | {row['measured']} |" in markdown
    proxy_row = next(line for line in markdown.splitlines() if line.startswith("| proxy |"))
    assert f"{ratio:.2f}× {BASELINE}" in proxy_row
    assert any(line.startswith(f"| {BASELINE} | ") for line in markdown.splitlines())


@pytest.mark.parametrize(("ratio", "rounds", "verdict"), [
    (0.99, [0.98, 1.0], "yes"), (0.95, [0.94, 0.96], "NO"),
    (0.96, [0.906, 1.098], "unclear: rounds on both sides"),  # a busy machine's spread
    (0.98, [0.95, 1.01], "unclear: rounds on both sides"),
])
def test_the_verdict_is_unclear_when_rounds_disagree(ratio: float, rounds: list[float],
                                                     verdict: str) -> None:
    assert baseline_verdict(ratio, rounds) == verdict


def test_a_ref_that_names_no_commit_is_refused_before_anything_starts(
    tmp_path: Path, redis_url: str,
) -> None:
    result = _bench(["--quick", "--scenarios", "nonstream", "--baseline", "no-such-ref-h4",
                     "--output-dir", str(tmp_path / "results")], redis_url)
    assert result.returncode == 2
    assert "--baseline" in result.stderr and "no-such-ref-h4" in result.stderr
    assert not (tmp_path / "results").exists()
