"""Queueing mail and configuring where it goes: what ``enqueue`` refuses (so text a
user typed can never add headers or recipients), how ``SMTP_URL`` is read, and that
maintenance deletes delivered mail past the retention period."""

from __future__ import annotations

import asyncpg
import pytest
import redis.asyncio as aioredis

from control_plane.mail.outbox import OutboxError, enqueue
from control_plane.mail.target import SmtpTarget, parse_smtp_url
from control_plane.metrics import Metrics
from control_plane.service import maintain_once
from control_plane.settings import Settings, SettingsError
from control_plane.trim import Trimmer

_OK: dict[str, str] = {"to_address": "alice@example.test", "kind": "transactional",
                       "template": "receipt", "subject": "Receipt", "body": "Thanks.\n"}


@pytest.mark.parametrize("bad", [
    {"subject": "Receipt\r\nBcc: victim@example.test"},
    {"to_address": "alice@example.test\nBcc: victim@example.test"},
    {"to_address": "alice@example.test, victim@example.test"},
    {"to_address": "not-an-address"},
    {"headers": {"List-Unsubscribe": "<https://x.test/u>\r\nBcc: v@example.test"}},
    {"headers": {"Bcc": "victim@example.test"}},
    {"headers": {"X-Bad:Name": "x"}},
    {"headers": {"X-Line\nBreak": "x"}},
    {"kind": "newsletter"},
])
async def test_enqueue_refuses_what_could_add_headers_or_recipients(
        pool: asyncpg.Pool, bad: dict[str, object]) -> None:
    async with pool.acquire() as conn:
        before = await conn.fetchval("SELECT count(*) FROM email_outbox")
        with pytest.raises(OutboxError):
            await enqueue(conn, **{**_OK, **bad})  # type: ignore[arg-type]
        assert await conn.fetchval("SELECT count(*) FROM email_outbox") == before


async def test_enqueue_stores_the_row_due_now(pool: asyncpg.Pool, account_id: str) -> None:
    async with pool.acquire() as conn:
        row_id = await enqueue(conn, account_id=account_id, **_OK)  # type: ignore[arg-type]
        row = await conn.fetchrow(
            "SELECT *, next_attempt_at <= now() AS due FROM email_outbox WHERE id = $1",
            row_id)
    assert row is not None
    assert (str(row["account_id"]), row["kind"], row["attempts"], row["due"]) == (
        account_id, "transactional", 0, True)
    assert row["sent_at"] is None


def test_smtp_url_forms() -> None:
    assert parse_smtp_url("smtp://127.0.0.1:1025") == SmtpTarget("127.0.0.1", 1025, False)
    assert parse_smtp_url("smtps://mail.example.test") == SmtpTarget(
        "mail.example.test", 465, True)
    target = parse_smtp_url("smtp://us%40er:p%2Fss@mail.example.test:587")
    assert (target.username, target.password, target.port) == ("us@er", "p/ss", 587)
    assert "p/ss" not in repr(target)


@pytest.mark.parametrize("raw", ["http://mail.example.test", "smtp://:25",
                                 "smtp://u:hunter2@mail.example.test:99999",
                                 "smtp://mail.example.test/path"])
def test_a_bad_smtp_url_is_refused_without_echoing_it(raw: str) -> None:
    env = {"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x", "SMTP_URL": raw}
    with pytest.raises(SettingsError, match="SMTP_URL") as caught:
        Settings.from_env(env)
    assert "hunter2" not in str(caught.value)


def test_unset_smtp_url_means_no_sender() -> None:
    env = {"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x"}
    assert Settings.from_env(env).smtp is None
    env["SMTP_URL"] = "smtp://127.0.0.1:1025"
    assert Settings.from_env(env).smtp == SmtpTarget("127.0.0.1", 1025, False)


async def test_maintenance_deletes_old_sent_and_given_up_rows_not_due_ones(
        settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis) -> None:
    async with pool.acquire() as conn:
        old_sent, old_given_up, old_due, new_sent = [
            await enqueue(conn, **_OK) for _ in range(4)]  # type: ignore[arg-type]
    await pool.execute(
        "UPDATE email_outbox SET created_at = now() - interval '31 days' WHERE id = ANY($1)",
        [old_sent, old_given_up, old_due])
    await pool.execute(
        "UPDATE email_outbox SET next_attempt_at = NULL, sent_at = now() WHERE id = ANY($1)",
        [old_sent, new_sent])
    await pool.execute(
        "UPDATE email_outbox SET next_attempt_at = NULL, last_error = 'smtp_550'"
        " WHERE id = $1", old_given_up)

    metrics = Metrics()
    await maintain_once(settings, pool, Trimmer(rclient, settings.names.events, metrics),
                        metrics)

    left = {r["id"] for r in await pool.fetch(
        "SELECT id FROM email_outbox WHERE id = ANY($1)",
        [old_sent, old_given_up, old_due, new_sent])}
    assert left == {old_due, new_sent}  # retention_days is 30 by default
