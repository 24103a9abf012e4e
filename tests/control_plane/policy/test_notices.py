"""The e-mail to every user on a material policy change: 1,000 users, the job (a real
``python -m control_plane policy-notify`` process) killed by SIGKILL halfway and run
again, and each of the 1,000 receives exactly one message at a real aiosmtpd; two runs
at once never queue one user twice; the rate limit paces the batches; a version that
is not material e-mails no one."""

from __future__ import annotations

import asyncio
import secrets
import signal
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from control_plane.errors import InvalidInput
from control_plane.mail.sender import Sender
from control_plane.policy import notices
from control_plane.settings import Settings
from tests.control_plane.mail.conftest import SmtpServer
from tests.control_plane.policy.conftest import PolicyFixture, add_version, drop_version
from tests.support import ModuleProcess

USERS = 1_000


async def _users(pool: asyncpg.Pool, n: int) -> dict[uuid.UUID, str]:
    """``n`` users, each owning an account; their addresses by id."""
    tag = secrets.token_hex(4)
    found = {uuid.uuid4(): f"notice-{tag}-{i}@example.test" for i in range(n)}
    ids, accounts = list(found), [uuid.uuid4() for _ in range(n)]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO accounts (id, name) SELECT unnest($1::uuid[]), 'n'",
                           accounts)
        await conn.execute("INSERT INTO users (id, email, email_verified) "
                           "SELECT unnest($1::uuid[]), unnest($2::text[]), true",
                           ids, list(found.values()))
        await conn.execute("INSERT INTO memberships (account_id, user_id, role) "
                           "SELECT unnest($1::uuid[]), unnest($2::uuid[]), 'owner'",
                           accounts, ids)
    return found


async def _marked(pool: asyncpg.Pool, version: str, users: dict[uuid.UUID, str]) -> int:
    found: int = await pool.fetchval(
        "SELECT count(*) FROM policy_notices WHERE version = $1 AND user_id = ANY($2)",
        version, list(users))
    return found


def _env(settings: Settings) -> dict[str, str]:
    return {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url,
            "QNP_REDIS_PREFIX": settings.redis_prefix, "PATH": "/usr/bin:/bin",
            "QNP_PUBLIC_URL": "https://qnp.example"}


async def test_a_job_killed_halfway_and_run_again_mails_each_user_exactly_once(
        settings: Settings, outbox_pool: asyncpg.Pool, smtp: SmtpServer,
        material: PolicyFixture, tmp_path: Path) -> None:
    users = await _users(outbox_pool, USERS)
    # 100 per transaction at 400 a second: the run takes seconds, so the kill lands in it.
    args = ["policy-notify", material.version, "--batch", "100", "--rate", "400"]
    first = ModuleProcess("control_plane", args, log_path=tmp_path / "first.log",
                          env=_env(settings))
    try:
        for _ in range(1200):  # bounded: 60 s
            if await _marked(outbox_pool, material.version, users) >= USERS // 5:
                break
            assert first.proc.poll() is None, first.log_text()
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(first.stop, signal.SIGKILL)
    at_kill = await _marked(outbox_pool, material.version, users)
    assert 0 < at_kill < USERS, "the kill must land halfway"
    # Whole batches only: every marker has its queued message, and no message lacks one.
    assert await outbox_pool.fetchval(
        "SELECT count(*) FROM policy_notices n JOIN email_outbox o ON o.id = n.outbox_id "
        "WHERE n.version = $1 AND n.user_id = ANY($2)", material.version, list(users)) \
        == at_kill

    second = ModuleProcess("control_plane", [*args, "--json"],
                           log_path=tmp_path / "second.log", env=_env(settings))
    assert await asyncio.to_thread(second.proc.wait, 120) == 0, second.log_text()
    assert await _marked(outbox_pool, material.version, users) == USERS

    # The job also told the users other tests left in the shared database; their mail
    # is parked so the senders deliver these 1,000.
    await outbox_pool.execute(
        "UPDATE email_outbox SET next_attempt_at = NULL WHERE template = 'policy_change' "
        "AND sent_at IS NULL AND NOT to_address = ANY($1)", list(users.values()))
    senders = [Sender(outbox_pool, smtp.target, "QNP <no-reply@qnp.test>", poll_s=0.05)
               for _ in range(4)]
    for _ in range(100):  # bounded: each pass sends up to 4 x 100
        if sum(await asyncio.gather(*(s.drain() for s in senders))) == 0:
            break
    received = Counter(m["To"] for m in smtp.messages() if m["To"] in users.values())
    assert received == Counter(users.values())  # every user, each exactly once
    sample = next(m for m in smtp.messages() if m["To"] in users.values())
    assert material.version in sample["Subject"]
    body = sample.get_payload(decode=True)
    assert isinstance(body, bytes) and b"https://qnp.example/privacy" in body
    logs = (tmp_path / "first.log").read_text() + second.log_text()
    assert "policy notices queued" in logs
    assert not [a for a in users.values() if a in logs]  # no address in the job's logs


async def test_two_runs_at_once_never_queue_a_user_twice(
        pool: asyncpg.Pool, material: PolicyFixture) -> None:
    users = await _users(pool, 300)
    runs = await asyncio.gather(*(notices.notify(pool, material.version, "https://q.test",
                                                 batch=50, rate_per_s=1e9)
                                  for _ in range(2)))
    per_user = await pool.fetch(
        "SELECT o.to_address, count(*) AS n FROM email_outbox o JOIN policy_notices p "
        "ON p.outbox_id = o.id WHERE p.version = $1 AND p.user_id = ANY($2) "
        "GROUP BY o.to_address", material.version, list(users))
    assert {r["to_address"]: r["n"] for r in per_user} == dict.fromkeys(users.values(), 1)
    assert await pool.fetchval(
        "SELECT count(*) FROM email_outbox WHERE template = 'policy_change' "
        "AND to_address = ANY($1)", list(users.values())) == 300
    assert sum(r.queued for r in runs) >= 300
    again = await notices.notify(pool, material.version, "https://q.test", rate_per_s=1e9)
    assert again.queued == 0  # done is done
    await pool.execute("UPDATE email_outbox SET next_attempt_at = NULL "
                       "WHERE template = 'policy_change'")  # not for other tests' senders


async def test_the_rate_limit_paces_the_batches(pool: asyncpg.Pool,
                                                material: PolicyFixture) -> None:
    await _users(pool, 120)
    now, slept = [0.0], []

    async def sleep(seconds: float) -> None:  # an injected clock: nothing really waits
        slept.append(seconds)
        now[0] += seconds

    run = await notices.notify(pool, material.version, "https://q.test", batch=40,
                               rate_per_s=20.0, clock=lambda: now[0], sleep=sleep)
    assert run.queued >= 120
    assert sum(slept) == pytest.approx(run.queued / 20.0)
    assert max(slept) <= 40 / 20.0 + 1e-9  # one batch's worth at a time
    await pool.execute("UPDATE email_outbox SET next_attempt_at = NULL "
                       "WHERE template = 'policy_change'")


async def test_a_version_that_is_not_material_mails_no_one(pool: asyncpg.Pool) -> None:
    minor = await add_version(pool, material=False)
    try:
        with pytest.raises(InvalidInput, match="not a material change"):
            await notices.notify(pool, minor.version, "https://q.test")
        with pytest.raises(InvalidInput, match="not in the database"):
            await notices.notify(pool, "1999-01", "https://q.test")
        assert await notices.progress(pool, minor.version) == 0
    finally:
        await drop_version(pool, minor.version)
