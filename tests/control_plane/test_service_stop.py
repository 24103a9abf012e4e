"""``python -m control_plane serve`` as a real process: SIGTERM stops it within its
grace while Redis and PostgreSQL are both gone, and each outage is one WARNING line per
store, never a traceback per retry (issue 10, finding 13)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from control_plane.migrate import migrate
from tests.chaos.conftest import OwnPostgres, OwnRedis, control_plane_env
from tests.support import ModuleProcess, free_port

pytestmark = pytest.mark.timeout(180)

GRACE_S = 3
# A hang guard, far above the grace: the assertion is that the process exits by itself.
HANG_GUARD_S = 60.0
OUTAGE_S = 8.0


def _warnings(log: str, store: str) -> list[str]:
    return [line for line in log.splitlines()
            if " WARNING " in line and re.search(store, line, re.IGNORECASE)]


@pytest.mark.parametrize("roles", [None, "web,ingest,admin", "ingest"])
async def test_sigterm_stops_serve_while_both_stores_are_down(
    tmp_path: Path, own_postgres: OwnPostgres, own_redis: OwnRedis, roles: str | None,
) -> None:
    await migrate(own_postgres.url)
    env = control_plane_env(own_postgres.url, own_redis.url, "stoptest",
                            QNP_SHUTDOWN_GRACE=str(GRACE_S), QNP_WEB_PORT=str(free_port()),
                            QNP_MAINTENANCE_INTERVAL_S="1")
    args = ["--role", roles] if roles else []
    process = ModuleProcess("control_plane", ["serve", *args], log_path=tmp_path / "cp.log",
                            env=env)
    try:
        process.wait_for_log("serving roles=")
        await asyncio.sleep(1.0)  # every role up and past its first pass
        own_redis.kill()
        own_postgres.stop()
        async with aiohttp.ClientSession() as client:
            if roles != "ingest":  # a keep-alive client of each listener stays connected
                for port in (env["QNP_ADMIN_PORT"], env["QNP_WEB_PORT"]):
                    async with client.get(f"http://127.0.0.1:{port}/healthz") as r:
                        await r.read()
            await asyncio.sleep(OUTAGE_S)  # many retries' worth of outage
            process.proc.terminate()
            code = await asyncio.to_thread(process.proc.wait, HANG_GUARD_S)
    finally:
        process.stop()
    log = process.log_text()
    assert code == 0, log
    assert "Traceback" not in log, log
    assert len(_warnings(log, "redis")) <= 1, log
    assert len(_warnings(log, "postgres")) <= 1, log
    assert "stopped" in log.splitlines()[-1], log
