"""``--with-sentry`` measures our proxy with SENTRY_DSN set (reporting to the tests'
sink) beside the plain one, in the same run, with the cost in ``report.md``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from tests.support import ROOT


def test_with_sentry_measures_the_monitored_proxy_against_the_plain_one(
    tmp_path: Path, redis_url: str,
) -> None:
    folder = tmp_path / "results"
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--scenarios", "nonstream",
            "--duration", "0.5", "--warmup", "0", "--concurrency", "4", "--with-sentry",
            "--output-dir", str(folder)]
    result = subprocess.run(argv, cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
                            capture_output=True, text=True, timeout=110, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = orjson.loads((folder / "report.json").read_bytes())
    [nonstream] = [s for s in report["scenarios"] if s["name"] == "nonstream"]
    monitored = nonstream["targets"]["proxy-sentry"]
    assert monitored["ok"] > 0 and not monitored["errors"]
    assert nonstream["comparisons"]["proxy-sentry"]["vs_plain"]["rps_per_core_ratio"] > 0
    assert report["proxies"]["proxy-sentry"]["requests"] \
        == report["proxies"]["proxy-sentry"]["events_emitted"]
    assert report["proxies"]["proxy-sentry"]["log_lines"] == 0
    assert "## What Sentry costs" in (folder / "report.md").read_text()
