"""The account API benchmark runs against a real ``serve --role web`` process and
reports every scenario with its proof (shape, not speed): all requests answered, no
Postgres statement per request once warm, a bcrypt bound far below one per request."""

from __future__ import annotations

from pathlib import Path

from benchmarks.account_api import report, run


async def test_the_account_api_benchmark_measures_and_proves_its_claims(
    scratch_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    figures, bcrypt_s = await run(scratch_database_url, redis_url, duration=0.5,
                                  concurrency=2, log_dir=tmp_path)
    assert [f.scenario.split(":")[0] for f in figures] == [
        "floor", "session check", "GET /api/v1/key, inference key"]
    for f in figures:
        assert f.requests > 50 and f.errors == {}, f
        assert f.cpu_s > 0
        # The CPU a request cost leaves room for a bcrypt run in at most a sliver of them.
        assert f.cpu_us / 1e6 / bcrypt_s < 0.1, (f, bcrypt_s)
    floor, session, key = figures
    assert floor.statements == 0 and session.statements == 0
    # The key document is refreshed once a second by each request then in flight.
    assert key.statements / key.requests < 0.05, key
    text = report(figures, bcrypt_s)
    assert "session check" in text and "req/CPU-s" in text
