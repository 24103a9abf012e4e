"""The ingest role runs the mail sender when SMTP_URL is set: a real ``serve --role
ingest`` process delivers a queued row to a real aiosmtpd, and stops cleanly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from control_plane.mail.outbox import enqueue
from control_plane.settings import Settings
from tests.control_plane.mail.conftest import SmtpServer
from tests.support import ModuleProcess


async def test_serve_ingest_delivers_the_outbox(
        settings: Settings, outbox_pool: asyncpg.Pool, smtp: SmtpServer,
        tmp_path: Path) -> None:
    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
           "QNP_REDIS_PREFIX": settings.redis_prefix, "PATH": "/usr/bin:/bin",
           "SMTP_URL": f"smtp://127.0.0.1:{smtp.port}",
           "QNP_MAIL_FROM": "QNP <no-reply@qnp.test>"}
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
