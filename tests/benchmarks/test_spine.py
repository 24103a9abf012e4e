"""Smoke test of ``make bench``: the spine benchmark runs end to end with tiny settings.

No wall-clock thresholds: only that all three targets (direct, the proxy with admission
and the proxy without) were measured without errors, that the admission-on proxy ran
admission against published account state (not the degraded local policy), that each
proxy emitted one event per request under its own node id, that admission's cost is
reported, and that nothing is left behind in Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent.parent
TARGETS = ("direct", "proxy", "proxy-noadmit")


def test_spine_measures_three_targets_without_errors(tmp_path: Path, redis_url: str) -> None:
    output = tmp_path / "spine.json"
    argv = [sys.executable, "-m", "benchmarks.spine", "--rounds", "1", "--duration", "0.5",
            "--warmup", "0.1", "--concurrency", "4", "--output", str(output)]
    result = subprocess.run(argv, cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
                            capture_output=True, text=True, timeout=90, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    report = orjson.loads(output.read_bytes())
    assert [s["name"] for s in report["scenarios"]] == ["chat", "stream", "latency"]
    for scenario in report["scenarios"]:
        assert tuple(scenario["targets"]) == TARGETS
        for target in TARGETS:
            measured = scenario["targets"][target]
            assert measured["rps"] > 0, (scenario["name"], target)
            assert measured["errors"] == {}, (scenario["name"], target)
        comparison = scenario["comparison"]
        for key, target, over in (("proxy_vs_direct", "proxy", "direct"),
                                  ("noadmit_vs_direct", "proxy-noadmit", "direct"),
                                  ("admission_cost", "proxy", "proxy-noadmit")):
            assert (comparison[key]["target"], comparison[key]["over"]) == (target, over)
            assert comparison[key]["rps_ratio"] > 0, (scenario["name"], key)
            assert comparison[key]["added_latency_ms"]["p50"] is not None
    stream = next(s for s in report["scenarios"] if s["name"] == "stream")
    for target in ("proxy", "proxy-noadmit"):
        assert stream["targets"][target]["ttfb_ms"]["p50"] > 0

    proxies = report["stack"]["proxies"]
    assert {name: p["admission"] for name, p in proxies.items()} == {
        "proxy": True, "proxy-noadmit": False}
    assert proxies["proxy"]["node_id"] != proxies["proxy-noadmit"]["node_id"]
    for name, proxy in proxies.items():
        # Each proxy's own events on the shared stream, one per request it answered.
        assert proxy["events_emitted"] == proxy["requests"] > 0, name
    # The admission-on proxy found the account's state: admitted by the Redis script,
    # not under the degraded policy that would make its numbers unrepresentative.
    assert proxies["proxy"]["unpublished_state_warnings"] == 0, proxies["proxy"]["log_head"]
    assert "no published state" not in "\n".join(proxies["proxy"]["log_head"])

    assert "| chat | proxy-noadmit |" in result.stdout
    assert "| chat | proxy/proxy-noadmit |" in result.stdout

    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"{report['stack']['redis_prefix']}:*")) == []
    finally:
        client.close()
