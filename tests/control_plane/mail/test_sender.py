"""The outbox sender against a real aiosmtpd process: a queued row arrives once with
its headers, SMTP being down delays it without losing it, two senders at once never
send one row twice, and no log line holds an address, a subject or a body."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from email.header import decode_header, make_header

import asyncpg
import pytest

from control_plane.mail.outbox import MAX_ATTEMPTS, MailKind, enqueue
from control_plane.mail.sender import Sender
from tests.control_plane.mail.conftest import SmtpServer

FROM = "QNP <no-reply@qnp.test>"


def _sender(pool: asyncpg.Pool, server: SmtpServer) -> Sender:
    return Sender(pool, server.target, FROM, poll_s=0.05, smtp_timeout_s=10.0)


async def _queue(pool: asyncpg.Pool, n: int = 1, **overrides: object) -> list[int]:
    fields: dict[str, object] = {
        "to_address": "alice@example.test", "kind": MailKind.TRANSACTIONAL,
        "template": "signin_notice", "subject": "New sign-in to QNP",
        "body": "Someone signed in to your account.\n"}
    fields.update(overrides)
    async with pool.acquire() as conn:
        return [await enqueue(conn, **fields) for _ in range(n)]  # type: ignore[arg-type]


async def _row(pool: asyncpg.Pool, row_id: int) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM email_outbox WHERE id = $1", row_id)
    assert row is not None
    return row


async def test_a_row_is_delivered_once_with_its_headers(
        outbox_pool: asyncpg.Pool, smtp: SmtpServer, account_id: str) -> None:
    unsubscribe = "<https://qnp.test/unsubscribe/t0ken>"
    [row_id] = await _queue(
        outbox_pool, account_id=account_id, kind=MailKind.MARKETING, template="news",
        subject="Grüße from QNP", body="Line one.\nLine two: ünïcödé.\n",
        headers={"List-Unsubscribe": unsubscribe,
                 "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})
    sender = _sender(outbox_pool, smtp)

    assert await sender.drain() == 1
    assert await sender.drain() == 0  # nothing left due: a second pass sends nothing

    [msg] = smtp.messages()
    assert msg["From"] == FROM
    assert msg["To"] == "alice@example.test"
    assert str(make_header(decode_header(msg["Subject"]))) == "Grüße from QNP"
    assert msg["Message-ID"] == f"<outbox-{row_id}@qnp.test>"
    assert msg["Date"]
    assert msg["List-Unsubscribe"] == unsubscribe
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert payload.decode(msg.get_content_charset() or "utf-8") == \
        "Line one.\nLine two: ünïcödé.\n"
    row = await _row(outbox_pool, row_id)
    assert row["sent_at"] is not None and row["attempts"] == 1
    assert row["next_attempt_at"] is None and row["last_error"] is None


async def test_a_rolled_back_enqueue_sends_nothing(
        outbox_pool: asyncpg.Pool, smtp: SmtpServer) -> None:
    class Abort(Exception):
        pass

    async with outbox_pool.acquire() as conn:
        with pytest.raises(Abort):
            async with conn.transaction():
                row_id = await enqueue(conn, to_address="bob@example.test",
                                       kind="transactional", template="receipt",
                                       subject="Receipt", body="Thanks.\n")
                raise Abort  # the caller's change failed: its mail must go with it
    assert await outbox_pool.fetchval(
        "SELECT count(*) FROM email_outbox WHERE id = $1", row_id) == 0
    assert await _sender(outbox_pool, smtp).drain() == 0
    assert smtp.messages() == []


async def test_smtp_down_is_retried_later_and_then_delivered(
        outbox_pool: asyncpg.Pool, smtp_down: SmtpServer) -> None:
    [row_id] = await _queue(outbox_pool)
    sender = _sender(outbox_pool, smtp_down)

    assert await sender.drain() == 0
    row = await _row(outbox_pool, row_id)
    assert (row["attempts"], row["last_error"], row["sent_at"]) == (1, "connect", None)
    wait = await outbox_pool.fetchval(
        "SELECT next_attempt_at - now() FROM email_outbox WHERE id = $1", row_id)
    assert wait.total_seconds() > 20  # backed off, not hammering a server that is down

    await smtp_down.start()
    assert await sender.drain() == 0  # not due yet: the back-off holds even once it is up
    assert smtp_down.messages() == []

    # Time passes (moved, not waited for): the row falls due and goes out.
    await outbox_pool.execute(
        "UPDATE email_outbox SET next_attempt_at = now() WHERE id = $1", row_id)
    assert await sender.drain() == 1
    assert [m["Message-ID"] for m in smtp_down.messages()] == [f"<outbox-{row_id}@qnp.test>"]
    row = await _row(outbox_pool, row_id)
    assert (row["attempts"], row["last_error"]) == (2, None)
    assert row["sent_at"] is not None


async def test_back_off_doubles_and_gives_up_after_the_last_attempt(
        outbox_pool: asyncpg.Pool, smtp_down: SmtpServer) -> None:
    [row_id] = await _queue(outbox_pool)
    sender = _sender(outbox_pool, smtp_down)
    waits = []
    for _ in range(MAX_ATTEMPTS):
        await outbox_pool.execute(
            "UPDATE email_outbox SET next_attempt_at = now() WHERE id = $1", row_id)
        assert await sender.drain() == 0
        waits.append(await outbox_pool.fetchval(
            "SELECT extract(epoch FROM next_attempt_at - now()) FROM email_outbox"
            " WHERE id = $1", row_id))
    assert waits[-1] is None  # given up: never scanned again
    assert float(waits[1]) / float(waits[0]) == pytest.approx(2, rel=0.1)
    assert max(float(w) for w in waits[:-1]) <= 3600
    row = await _row(outbox_pool, row_id)
    assert (row["attempts"], row["last_error"], row["sent_at"]) == (
        MAX_ATTEMPTS, "connect", None)


async def test_two_senders_at_once_never_send_one_row_twice(
        outbox_pool: asyncpg.Pool, smtp: SmtpServer) -> None:
    ids = await _queue(outbox_pool, 40)
    first, second = _sender(outbox_pool, smtp), _sender(outbox_pool, smtp)

    counts = await asyncio.gather(first.drain(), second.drain())

    assert sum(counts) == len(ids)
    assert min(counts) > 0  # both really worked the queue at the same time
    received = Counter(m["Message-ID"] for m in smtp.messages())
    assert received == Counter(f"<outbox-{i}@qnp.test>" for i in ids)
    assert await outbox_pool.fetchval(
        "SELECT count(*) FROM email_outbox WHERE id = ANY($1) AND attempts = 1"
        " AND sent_at IS NOT NULL", ids) == len(ids)


async def test_the_task_runs_until_stopped_and_delivers_what_is_queued(
        outbox_pool: asyncpg.Pool, smtp: SmtpServer) -> None:
    sender = _sender(outbox_pool, smtp)
    task = asyncio.create_task(sender.run())
    try:
        [row_id] = await _queue(outbox_pool)
        for _ in range(400):  # bounded: the task polls every 50 ms
            if await outbox_pool.fetchval(
                    "SELECT sent_at IS NOT NULL FROM email_outbox WHERE id = $1", row_id):
                break
            await asyncio.sleep(0.05)
    finally:
        sender.stop()
        await asyncio.wait_for(task, 10)
    assert [m["Message-ID"] for m in smtp.messages()] == [f"<outbox-{row_id}@qnp.test>"]


async def test_no_log_line_holds_an_address_subject_or_body(
        outbox_pool: asyncpg.Pool, smtp_down: SmtpServer,
        caplog: pytest.LogCaptureFixture) -> None:
    canary = uuid.uuid4().hex
    address, subject, body = f"{canary}@example.test", f"subj-{canary}", f"body-{canary}"
    caplog.set_level(logging.DEBUG)
    [row_id] = await _queue(outbox_pool, to_address=address, subject=subject, body=body)
    sender = _sender(outbox_pool, smtp_down)

    await sender.drain()  # fails: SMTP down
    await smtp_down.start()
    await outbox_pool.execute(
        "UPDATE email_outbox SET next_attempt_at = now() WHERE id = $1", row_id)
    assert await sender.drain() == 1

    lines = [r.getMessage() for r in caplog.records]
    assert any(f"id={row_id}" in line and "error=connect" in line for line in lines)
    assert any(f"mail sent id={row_id}" in line for line in lines)
    assert [line for line in lines if canary in line] == []


async def test_smtp_down_costs_one_attempt_per_pass_not_one_per_row(
        outbox_pool: asyncpg.Pool, smtp_down: SmtpServer) -> None:
    ids = await _queue(outbox_pool, 5)
    assert await _sender(outbox_pool, smtp_down).drain() == 0
    attempts = await outbox_pool.fetch(
        "SELECT attempts FROM email_outbox WHERE id = ANY($1) ORDER BY id", ids)
    # The first row found the server down; the others stay due, their attempts unspent.
    assert sorted(r["attempts"] for r in attempts) == [0, 0, 0, 0, 1]


async def test_a_backlog_larger_than_a_batch_drains_without_pausing(
        outbox_pool: asyncpg.Pool, smtp: SmtpServer) -> None:
    ids = await _queue(outbox_pool, 7)
    # A poll interval no test waits out: only the no-pause path can send all 7.
    sender = Sender(outbox_pool, smtp.target, FROM, poll_s=3600, batch=2)
    task = asyncio.create_task(sender.run())
    try:
        for _ in range(400):  # bounded
            if len(smtp.messages()) >= len(ids):
                break
            await asyncio.sleep(0.05)
    finally:
        sender.stop()
        await asyncio.wait_for(task, 10)
    assert len(smtp.messages()) == len(ids)


async def test_a_row_that_cannot_become_a_message_is_given_up_not_blocking_the_queue(
        outbox_pool: asyncpg.Pool, smtp: SmtpServer) -> None:
    # Written around enqueue's checks (by hand, or by an older release).
    poison = await outbox_pool.fetchval(
        "INSERT INTO email_outbox (to_address, kind, template, subject, body, headers,"
        " next_attempt_at) VALUES ('x@example.test', 'transactional', 't', 's', 'b',"
        " '{\"X-Evil\": \"a\\r\\nBcc: v@example.test\"}', now() - interval '1 hour')"
        " RETURNING id")
    [good] = await _queue(outbox_pool)

    assert await _sender(outbox_pool, smtp).drain() == 1
    assert [m["Message-ID"] for m in smtp.messages()] == [f"<outbox-{good}@qnp.test>"]
    row = await _row(outbox_pool, poison)
    assert (row["last_error"], row["next_attempt_at"], row["sent_at"]) == (
        "bad_message", None, None)
