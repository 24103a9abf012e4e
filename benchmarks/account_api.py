"""Account API benchmark: requests per CPU-second of the web process for
``GET /api/v1/key`` (an inference key, warm cache) and for the session check (a signed-in
session cookie), and proof that neither runs bcrypt nor a Postgres query per request.

    python -m benchmarks.account_api [--duration 10] [--concurrency 32]

Starts a real ``python -m control_plane serve --role web`` process over throwaway
Postgres and Redis (devstack; DATABASE_URL / REDIS_URL when set), signs a user up and
issues an inference key (bcrypt at the production cost, QNP_BCRYPT_ROUNDS 12) directly
in the database, and drives each scenario with the suite's load generator, closed loop.
The web process reaches Postgres through a relay here that counts the statements it
sends (Query and Execute messages), so "Postgres statements per request" is exact, not
sampled from delayed statistics. CPU is the web process's user + system time (psutil).
bcrypt cannot be counted from outside, so it is bounded: a run whose CPU per request is
C and whose bcrypt verification costs B did at most C / B verifications per request.

Scenarios (the session check runs in the web service's one guard middleware for every
route, so a route that does nothing else isolates it):
- ``floor``: ``GET /healthz`` with no credential: the web stack alone;
- ``session``: ``GET /healthz`` with the session cookie (JWT check + the cached session
  state); a tampered cookie on the same route gets 401, proving the check runs there;
- ``key``: ``GET /api/v1/key`` with the inference key (the cached key check + the cached
  key document, refreshed from Postgres once a second per replica).

Must not import ``proxy``; imports ``control_plane`` only to set up the data.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import bcrypt
import redis.asyncio as aioredis
import uvloop

from benchmarks import loadgen, procstat
from benchmarks.databases import scratch_database
from benchmarks.stack import ROOT, Child, free_port, http_ok
from control_plane import keys, users
from control_plane.auth.oidc import Identity
from control_plane.auth.sessions import COOKIE, Sessions
from control_plane.migrate import migrate
from control_plane.outages import Outages
from devstack.servers import dev_servers
from shared.redis_names import RedisNames

BCRYPT_ROUNDS = 12  # the production default (QNP_BCRYPT_ROUNDS)
_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104
_STATEMENTS = frozenset(b"QE")  # simple Query, extended-protocol Execute


class CountingRelay:
    """A TCP relay to Postgres that counts the statements its clients send."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self.statements = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        back = asyncio.create_task(self._pipe(up_reader, writer))
        forth = asyncio.create_task(self._frontend(reader, up_writer))
        self._tasks |= {back, forth}
        try:
            await asyncio.wait({back, forth}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (back, forth):
                task.cancel()
                self._tasks.discard(task)
            for w in (writer, up_writer):
                w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def _frontend(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        buf, startup = bytearray(), True
        while data := await reader.read(65536):
            writer.write(data)
            buf += data
            while True:
                if startup:  # untyped: length, then a request code or protocol version
                    if len(buf) < 8 or len(buf) < (n := int.from_bytes(buf[:4])):
                        break
                    code = int.from_bytes(buf[4:8])
                    del buf[:n]
                    startup = code in (_SSL_REQUEST, _GSSENC_REQUEST)
                else:  # typed: one byte, then a length that counts itself
                    if len(buf) < 5 or len(buf) < (n := int.from_bytes(buf[1:5])) + 1:
                        break
                    self.statements += buf[0] in _STATEMENTS
                    del buf[:n + 1]
            await writer.drain()


@dataclass(frozen=True, slots=True)
class Figures:
    scenario: str
    requests: int
    errors: dict[str, int]
    wall_rps: float
    elapsed_s: float
    cpu_s: float
    statements: int
    p50_ms: float
    p99_ms: float

    @property
    def per_cpu_s(self) -> float:
        return self.requests / self.cpu_s if self.cpu_s > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else 0.0

    def to_json(self, bcrypt_s: float) -> dict[str, Any]:
        return {"scenario": self.scenario, "requests": self.requests, "errors": self.errors,
                "wall_rps": round(self.wall_rps), "cpu_s": round(self.cpu_s, 3),
                "requests_per_cpu_s": round(self.per_cpu_s), "cpu_us_per_request":
                round(self.cpu_us, 1), "postgres_statements": self.statements,
                "postgres_statements_per_request": self.statements / max(1, self.requests),
                "postgres_statements_per_s": self.statements / max(1e-9, self.elapsed_s),
                "bcrypt_per_request_at_most": self.cpu_us / 1e6 / bcrypt_s,
                "p50_ms": self.p50_ms, "p99_ms": self.p99_ms}


async def _seed(database_url: str, redis_url: str, names: RedisNames, secret: str
                ) -> tuple[str, str]:
    """A signed-up user with a session and an inference key: (cookie value, API key)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        tag = secrets.token_hex(4)
        identity = Identity(provider="bench", subject=f"bench-{tag}",
                            email=f"bench-{tag}@example.test", email_verified=True,
                            name=None)
        async with pool.acquire() as conn, conn.transaction():
            member = await users.sign_up(conn, redis, names, identity, "bench")
        sessions = Sessions(secret, pool, redis, names, Outages())
        sid = await sessions.create(pool, member.user_id, member.account_id, "benchmark")
        issued = await keys.issue_key(pool, redis, names, str(member.account_id), "bench",
                                      bcrypt_rounds=BCRYPT_ROUNDS)
        return sessions.cookie_value(sid), issued.key
    finally:
        await redis.aclose()
        await pool.close()


def _bcrypt_cost_s() -> float:
    hashed = bcrypt.hashpw(b"benchmark-secret", bcrypt.gensalt(BCRYPT_ROUNDS))
    started = time.process_time()
    for _ in range(3):
        bcrypt.checkpw(b"benchmark-secret", hashed)
    return (time.process_time() - started) / 3


def _status(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - our own 127.0.0.1
    try:
        with urllib.request.urlopen(request, timeout=5.0) as resp:  # noqa: S310
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


async def _quiet(relay: CountingRelay, still_s: float = 0.5, limit_s: float = 15.0) -> None:
    """Until the web process's start-up work (migrations check, the maintenance job's
    first pass) has stopped sending statements, so a scenario counts only its own."""
    deadline = time.monotonic() + limit_s
    seen = -1
    while seen != relay.statements and time.monotonic() < deadline:
        seen = relay.statements
        await asyncio.sleep(still_s)


async def _measure(name: str, url: str, headers: tuple[tuple[str, str], ...],
                   pid: int, relay: CountingRelay, concurrency: int,
                   duration: float) -> Figures:
    warm = loadgen.LoadSpec(url=url, headers=headers, concurrency=concurrency,
                            duration=min(1.0, duration), max_requests=2000)
    await loadgen.run(warm)  # caches filled, connections open, allocator steady
    procs = procstat.tree([pid])
    cpu = procstat.read(procs).cpu_s
    statements = relay.statements
    spec = loadgen.LoadSpec(url=url, headers=headers, concurrency=concurrency,
                            duration=duration, timeout=10.0)
    result = await loadgen.run(spec)
    cpu_s = procstat.read(procs).cpu_s - cpu
    ms = result.histograms["latency"].summary_ms()
    return Figures(name, result.ok, dict(result.errors), result.rps, result.elapsed_s, cpu_s,
                   relay.statements - statements, float(ms["p50"] or 0),
                   float(ms["p99"] or 0))


async def run(database_url: str, redis_url: str, duration: float, concurrency: int,
              log_dir: Path) -> tuple[list[Figures], float]:
    prefix = f"bench{secrets.token_hex(4)}"
    names, secret = RedisNames(prefix), secrets.token_urlsafe(32)
    await migrate(database_url)
    cookie, api_key = await _seed(database_url, redis_url, names, secret)
    db = urlsplit(database_url)
    relay = CountingRelay(db.hostname or "127.0.0.1", db.port or 5432)
    relay_port = await relay.start()
    netloc = (db.netloc.rsplit("@", 1)[0] + "@" if "@" in db.netloc else "") \
        + f"127.0.0.1:{relay_port}"
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
           "DATABASE_URL": urlunsplit(db._replace(netloc=netloc, query="sslmode=disable")),
           "REDIS_URL": redis_url, "QNP_REDIS_PREFIX": prefix, "QNP_WEB_HOST": "127.0.0.1",
           "QNP_WEB_PORT": str(port), "QNP_PUBLIC_URL": origin,
           "QNP_SESSION_SECRET": secret, "QNP_BCRYPT_ROUNDS": str(BCRYPT_ROUNDS),
           "QNP_MAINTENANCE_INTERVAL_S": "86400", "QNP_LOG_LEVEL": "WARNING"}
    child = Child("web", [sys.executable, "-m", "control_plane", "serve", "--role", "web"],
                  env, log_dir / "web.log", None)
    try:
        await asyncio.to_thread(child.wait_ready, http_ok(f"{origin}/healthz"))
        session = (("Cookie", f"{COOKIE}={cookie}"),)
        tampered = await asyncio.to_thread(
            _status, f"{origin}/healthz", {"Cookie": f"{COOKIE}={cookie}x"})
        if tampered != 401:
            raise RuntimeError(f"a tampered cookie on /healthz got {tampered}, not 401")
        pid = child.pid
        await _quiet(relay)
        figures = [
            await _measure("floor: GET /healthz, no credential", f"{origin}/healthz", (),
                           pid, relay, concurrency, duration),
            await _measure("session check: GET /healthz, session cookie",
                           f"{origin}/healthz", session, pid, relay, concurrency, duration),
            await _measure("GET /api/v1/key, inference key", f"{origin}/api/v1/key",
                           (("Authorization", f"Bearer {api_key}"),), pid, relay,
                           concurrency, duration),
        ]
    finally:
        await asyncio.to_thread(child.stop)
        await relay.close()
        redis = aioredis.Redis.from_url(redis_url)
        async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
            await redis.delete(key)
        await redis.aclose()
    return figures, await asyncio.to_thread(_bcrypt_cost_s)


def report(figures: list[Figures], bcrypt_s: float) -> str:
    floor = figures[0]
    lines = [f"bcrypt verification at cost {BCRYPT_ROUNDS}: {bcrypt_s * 1e3:.0f} ms CPU",
             f"{'scenario':<46} {'req/CPU-s':>9} {'µs CPU/req':>10} {'+floor':>7} "
             f"{'wall rps':>8} {'PG stmts/req':>12} {'bcrypt/req ≤':>12} {'errors':>6}"]
    for f in figures:
        extra = "" if f is floor else f"{f.cpu_us - floor.cpu_us:+.0f}"
        lines.append(
            f"{f.scenario:<46} {f.per_cpu_s:>9,.0f} {f.cpu_us:>10.0f} {extra:>7} "
            f"{f.wall_rps:>8,.0f} {f.statements / max(1, f.requests):>12.5f} "
            f"{f.cpu_us / 1e6 / bcrypt_s:>12.5f} {sum(f.errors.values()):>6}")
    key = figures[-1]
    lines.append(
        f"({key.requests:,} key requests in {key.elapsed_s:.1f} s sent {key.statements} "
        f"Postgres statements, {key.statements / max(1e-9, key.elapsed_s):.0f}/s: the key "
        "document's refresh once a second, by each request in flight when it expires)")
    return "\n".join(lines)


async def main(duration: float, concurrency: int) -> None:
    with dev_servers() as (server_url, redis_url), tempfile.TemporaryDirectory() as tmp:
        async with scratch_database(server_url) as database_url:
            figures, bcrypt_s = await run(database_url, redis_url, duration, concurrency,
                                          Path(tmp))
    print(report(figures, bcrypt_s))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--concurrency", type=int, default=32, help="connections")
    args = parser.parse_args()
    uvloop.run(main(args.duration, args.concurrency))
