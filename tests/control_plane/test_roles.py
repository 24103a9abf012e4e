"""Which roles ``serve --role`` runs, and that a process without the admin role needs
no admin token and opens no admin port."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from control_plane.roles import RoleError, parse_roles
from control_plane.settings import Settings
from tests.support import ModuleProcess, free_port, wait_for_http


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, ("ingest", "admin", "web")),
        (["web"], ("web",)),
        (["web,ingest"], ("ingest", "web")),
        (["admin", "web", "admin"], ("admin", "web")),
        ([" ingest , "], ("ingest",)),
    ],
)
def test_roles_are_repeatable_and_comma_separated(
    given: list[str] | None, expected: tuple[str, ...]
) -> None:
    assert parse_roles(given) == expected


def test_an_unknown_role_is_refused_by_name() -> None:
    with pytest.raises(RoleError, match="dashboard"):
        parse_roles(["web,dashboard"])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_a_web_only_process_serves_web_and_nothing_else(
    settings: Settings, tmp_path: Path
) -> None:
    web_port, admin_port = free_port(), free_port()
    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
           "QNP_REDIS_PREFIX": settings.redis_prefix, "QNP_WEB_PORT": str(web_port),
           "QNP_ADMIN_PORT": str(admin_port), "PATH": "/usr/bin:/bin"}  # no admin token
    with ModuleProcess("control_plane", ["serve", "--role", "web"],
                       log_path=tmp_path / "web.log", env=env) as proc:
        await wait_for_http(f"http://127.0.0.1:{web_port}/healthz", expect_status=200)
        assert not _listening(admin_port)
        await asyncio.sleep(0.3)
        assert "ingest started" not in proc.log_text()
        assert await asyncio.to_thread(proc.stop) == 0
    assert "serving roles=web" in proc.log_text()
