"""``make run`` shows a newcomer the mail the control plane sends: a row queued in the
outbox comes out, headers and body, in make run's own output (a local aiosmtpd)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import asyncpg

from control_plane.mail.outbox import enqueue
from shared.redis_names import RedisNames
from tests.support import ModuleProcess

BANNER = "QNP gateway is running"


async def test_make_run_prints_each_mail_it_sends(
    tmp_path: Path, scratch_database_url: str, redis_url: str, redis_names: RedisNames,
) -> None:
    env = {**os.environ, "DATABASE_URL": scratch_database_url, "REDIS_URL": redis_url,
           "QNP_REDIS_PREFIX": redis_names.prefix, "QNP_BCRYPT_ROUNDS": "4"}
    env.pop("SMTP_URL", None)
    subject = f"Welcome {uuid.uuid4().hex}"
    with ModuleProcess("devstack.run", log_path=tmp_path / "make-run.log", env=env) as run:
        banner = run.wait_for_log(BANNER, timeout=120)
        assert "E-mail goes to a local SMTP server (smtp://127.0.0.1:" in banner
        conn = await asyncpg.connect(scratch_database_url)
        try:
            await enqueue(conn, to_address="dev@example.test", kind="transactional",
                          template="welcome", subject=subject, body="Hello from QNP.\n")
        finally:
            await conn.close()
        log = run.wait_for_log(f"Subject: {subject}", timeout=60)  # one poll, bounded
        assert run.stop() == 0
    assert "To: dev@example.test" in log
    assert "Hello from QNP." in log
