"""``python -m control_plane`` as scripts and operators run it, in a real subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from control_plane.settings import Settings
from shared.apikeys import KeyRecord, parse
from shared.events import STREAM_FIELD
from tests.control_plane.factories import ADMIN_TOKEN, make_event
from tests.support import ROOT, ModuleProcess, free_port, wait_for_http


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    ours = ("QNP_", "DATABASE_URL", "REDIS_URL")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    return {
        **keep,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "QNP_REDIS_PREFIX": settings.redis_prefix,
        "QNP_BCRYPT_ROUNDS": "4",
        "QNP_WEB_PORT": str(free_port()),
        **extra,
    }


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "control_plane", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _json(env: dict[str, str], *args: str) -> Any:
    code, out, err = await _cli(env, *args, "--json")
    assert code == 0, err
    return orjson.loads(out)


async def test_json_commands_script_the_whole_key_lifecycle(
    settings: Settings, rclient: aioredis.Redis
) -> None:
    env = _env(settings)
    assert (await _json(env, "migrate"))["applied"] == []  # the session already migrated

    account = await _json(env, "create-account", "demo")
    issued = await _json(env, "issue-key", account["id"], "--name", "ci")
    listed = await _json(env, "list-keys", account["id"])
    revoked = await _json(env, "revoke-key", issued["key_id"])
    used = await _json(env, "usage", account["id"], "--limit", "5")

    assert account["name"] == "demo" and account["status"] == "active"
    assert parse(issued["key"]).key_id == issued["key_id"]
    assert issued["account_id"] == account["id"] and issued["name"] == "ci"
    assert [k["key_id"] for k in listed["keys"]] == [issued["key_id"]]
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    assert used["records"] == [] and used["totals"]["requests"] == 0
    record = KeyRecord.decode(await rclient.get(settings.names.key_record(issued["key_id"])))
    assert record.status == "revoked"


async def test_failures_exit_nonzero_with_a_message(settings: Settings) -> None:
    code, out, err = await _cli(_env(settings), "list-keys", "nope", "--json")
    assert (code, out) == (1, "")
    assert orjson.loads(err)["error"]["type"] == "not_found"

    env = _env(settings)
    del env["DATABASE_URL"]
    code, _, err = await _cli(env, "create-account", "demo")
    assert code == 2 and "DATABASE_URL" in err

    code, _, err = await _cli(_env(settings), "serve")
    assert code == 2 and "QNP_ADMIN_TOKEN" in err
    code, _, err = await _cli(_env(settings), "serve", "--role", "web,admin")
    assert code == 2 and "QNP_ADMIN_TOKEN" in err
    code, _, err = await _cli(_env(settings, QNP_ADMIN_TOKEN=ADMIN_TOKEN), "serve",
                              "--role", "web", "--role", "billing")
    assert code == 2 and "unknown role billing" in err

    down = _env(settings, QNP_ADMIN_TOKEN=ADMIN_TOKEN,
                DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    code, _, err = await _cli(down, "serve")
    assert code == 1 and "Postgres is unavailable" in err and "Traceback" not in err


async def test_serve_ingests_and_stops_cleanly_on_sigterm(
    settings: Settings, rclient: aioredis.Redis, tmp_path: Path
) -> None:
    port = free_port()
    env = _env(settings, QNP_ADMIN_TOKEN=ADMIN_TOKEN, QNP_ADMIN_PORT=str(port),
               QNP_INGEST_BLOCK_MS="100")
    account = await _json(env, "create-account", "served")
    with ModuleProcess("control_plane", ["serve"], log_path=tmp_path / "serve.log",
                       env=env) as proc:
        await wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=20, expect_status=200)
        event = make_event(account["id"])
        await rclient.xadd(settings.names.events, {STREAM_FIELD: event.encode()})
        url = f"http://127.0.0.1:{port}/admin/accounts/{account['id']}/usage"
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        records: list[Any] = []
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                async with session.get(url, headers=headers) as r:
                    records = (await r.json())["records"]
                if records:
                    break
                await asyncio.sleep(0.05)
        assert [r["id"] for r in records] == [event.id]

        assert await asyncio.to_thread(proc.stop, signal.SIGTERM) == 0
    log = proc.log_text()
    assert "ingest stopped" in log and "Traceback" not in log
    assert event.id not in log
