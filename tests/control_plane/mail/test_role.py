"""The ingest role runs the mail sender when SMTP_URL is set: a real ``serve --role
ingest`` process delivers a queued row to a real aiosmtpd and stops cleanly, and one
killed halfway through a backlog loses nothing and resends at most one message."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import asyncpg

from control_plane.mail.outbox import enqueue
from control_plane.settings import Settings
from tests.control_plane.mail.conftest import SmtpServer
from tests.support import ModuleProcess


def _env(settings: Settings, smtp: SmtpServer) -> dict[str, str]:
    return {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
            "QNP_REDIS_PREFIX": settings.redis_prefix, "PATH": "/usr/bin:/bin",
            "SMTP_URL": f"smtp://127.0.0.1:{smtp.port}",
            "QNP_MAIL_FROM": "QNP <no-reply@qnp.test>"}


async def test_serve_ingest_delivers_the_outbox(
        settings: Settings, outbox_pool: asyncpg.Pool, smtp: SmtpServer,
        tmp_path: Path) -> None:
    env = _env(settings, smtp)
    async with outbox_pool.acquire() as conn:
        row_id = await enqueue(conn, to_address="carol@example.test", kind="transactional",
                               template="signin_notice", subject="Sign-in", body="Hi.\n")
    with ModuleProcess("control_plane", ["serve", "--role", "ingest"],
                       log_path=tmp_path / "ingest.log", env=env) as proc:
        for _ in range(600):  # bounded: up to one 5 s poll after start-up
            if smtp.messages():
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(proc.stop) == 0
    assert [m["Message-ID"] for m in smtp.messages()] == [f"<outbox-{row_id}@qnp.test>"]
    assert "mail sender started" in proc.log_text()
    assert await outbox_pool.fetchval(
        "SELECT sent_at IS NOT NULL FROM email_outbox WHERE id = $1", row_id)


async def test_a_sender_killed_halfway_loses_nothing_and_resends_at_most_one(
        settings: Settings, outbox_pool: asyncpg.Pool, smtp: SmtpServer,
        tmp_path: Path) -> None:
    total = 300
    async with outbox_pool.acquire() as conn, conn.transaction():
        ids = [await enqueue(conn, to_address=f"user{i}@example.test", kind="transactional",
                             template="policy_change", subject="Our policy changed",
                             body="Read it.\n") for i in range(total)]
    env = _env(settings, smtp)
    first = ModuleProcess("control_plane", ["serve", "--role", "ingest"],
                          log_path=tmp_path / "first.log", env=env)
    try:
        for _ in range(1200):  # bounded; kill once a part, not all, went out
            if len(smtp.messages()) >= total // 5:
                break
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(first.stop, signal.SIGKILL)
    before_restart = len(smtp.messages())
    assert 0 < before_restart < total, "the kill must land halfway"

    with ModuleProcess("control_plane", ["serve", "--role", "ingest"],
                       log_path=tmp_path / "second.log", env=env) as second:
        for _ in range(1200):  # bounded
            if await outbox_pool.fetchval(
                    "SELECT count(*) FROM email_outbox WHERE id = ANY($1)"
                    " AND sent_at IS NULL", ids) == 0:
                break
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(second.stop) == 0

    received = Counter(m["Message-ID"] for m in smtp.messages())
    expected = {f"<outbox-{i}@qnp.test>" for i in ids}
    assert set(received) == expected  # every row arrived, nothing else did
    resent = [mid for mid, n in received.items() if n > 1]
    assert len(resent) <= 1 and max(received.values()) <= 2  # the one documented gap
