"""Smoke test of ``make bench``: the spine benchmark runs end to end with tiny settings.

No wall-clock thresholds: only that both targets were measured, without errors, that
the proxy emitted one event per request, and that nothing is left behind in Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent.parent


def test_spine_measures_both_targets_without_errors(tmp_path: Path, redis_url: str) -> None:
    output = tmp_path / "spine.json"
    argv = [sys.executable, "-m", "benchmarks.spine", "--rounds", "1", "--duration", "0.5",
            "--warmup", "0.1", "--concurrency", "4", "--output", str(output)]
    result = subprocess.run(argv, cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    report = orjson.loads(output.read_bytes())
    assert [s["name"] for s in report["scenarios"]] == ["chat", "stream", "latency"]
    for scenario in report["scenarios"]:
        for target in ("direct", "proxy"):
            measured = scenario["targets"][target]
            assert measured["rps"] > 0, (scenario["name"], target)
            assert measured["errors"] == {}, (scenario["name"], target)
        assert scenario["comparison"]["rps_ratio"] > 0
    stream = next(s for s in report["scenarios"] if s["name"] == "stream")
    assert stream["targets"]["proxy"]["ttfb_ms"]["p50"] > 0
    stack = report["stack"]
    assert stack["events_emitted"] == stack["proxy_requests"] > 0
    assert "| chat | proxy |" in result.stdout and "proxy/direct rps" in result.stdout

    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"{stack['redis_prefix']}:*")) == []
    finally:
        client.close()
