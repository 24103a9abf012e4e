"""The sender task: delivers the outbox's due rows over SMTP (aiosmtplib), one message
per row, and records each outcome in the transaction that claimed the row. Imports
``mail.outbox`` and ``mail.target``; never ``proxy`` or ``control_plane.web``.

Exactly once, and its one gap: a row is locked (``FOR UPDATE SKIP LOCKED``) while its
message is handed to the SMTP server and marked sent before that transaction commits,
so two senders never send one row and a row is never sent after it was marked. If the
process dies (or Postgres goes away) after the server accepted the message and before
the commit, the row is still due and is sent again: at most one duplicate per crash.
That message carries the same ``Message-ID`` (derived from the row id), so mail
clients and most servers fold the two into one.

Logs name the row id, template, attempt and an error code; never an address, a
subject, a body or a server's reply (replies echo addresses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr

import aiosmtplib
import asyncpg

from control_plane.mail import outbox
from control_plane.mail.outbox import OutboxRow
from control_plane.mail.target import SmtpTarget

# Flattened here with RFC 5322's line limit, not the 78 characters aiosmtplib's policy
# folds at: a header with no space to fold at (a List-Unsubscribe URL, RFC 8058) would
# otherwise go out as RFC 2047 encoded words, which mail clients do not read as a URL.
_WIRE = policy.SMTP.clone(max_line_length=998)

log = logging.getLogger(__name__)

_STORE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
# Failures that say the server is not reachable, not that this message is at fault.
_UNREACHABLE = frozenset({"connect", "disconnected", "timeout", "network"})


class Sender:
    """Drains the outbox every ``poll_s`` seconds until stopped."""

    def __init__(self, pool: asyncpg.Pool, target: SmtpTarget, mail_from: str, *,
                 poll_s: float = 5.0, batch: int = 100, smtp_timeout_s: float = 30.0) -> None:
        self._pool, self._target, self._from = pool, target, mail_from
        self._poll_s, self._batch, self._timeout = poll_s, batch, smtp_timeout_s
        self._envelope_from = parseaddr(mail_from)[1]
        domain = self._envelope_from.rpartition("@")[2]
        self._id_domain = domain or "localhost"
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        log.info("mail sender started host=%s port=%d", self._target.host, self._target.port)
        while not self._stopping.is_set():
            more = False
            try:
                _, more = await self._pass()
            except _STORE_ERRORS as e:
                log.warning("mail sender: postgres unavailable (%s); will retry",
                            type(e).__name__)
            except Exception:  # top of the task: log it, keep the task alive
                log.exception("mail sender pass failed")
            if more:  # a full batch: more may be due, so no pause (a backlog drains fast)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._poll_s)

    async def drain(self) -> int:
        """One pass over the due rows; how many were sent."""
        sent, _ = await self._pass()
        return sent

    async def _pass(self) -> tuple[int, bool]:
        """Attempt up to ``batch`` due rows, each in its own transaction. Returns how
        many were sent and whether the batch was full (more may be due). A pass ends at
        the first failure to reach the server: the rows after it would fail the same way,
        and stay due untouched rather than each spending an attempt."""
        sent = 0
        for _ in range(self._batch):
            if self._stopping.is_set():
                return sent, False
            async with self._pool.acquire() as conn, conn.transaction():
                row = await outbox.claim(conn)
                if row is None:
                    return sent, False
                failure = await self._deliver(row)
                if failure is None:
                    await outbox.mark_sent(conn, row.id)
                    sent += 1
                    log.info("mail sent id=%d template=%s attempt=%d",
                             row.id, row.template, row.attempts + 1)
                    continue
                code, permanent = failure
                gave_up = await outbox.mark_failed(conn, row, code, permanent=permanent)
                log.warning("mail not sent id=%d template=%s attempt=%d error=%s%s",
                            row.id, row.template, row.attempts + 1, code,
                            " (given up)" if gave_up else "")
            if code in _UNREACHABLE:
                return sent, False
        return sent, True

    def message(self, row: OutboxRow) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self._from
        msg["To"] = row.to_address
        msg["Subject"] = row.subject
        msg["Date"] = format_datetime(row.created_at)
        msg["Message-ID"] = f"<outbox-{row.id}@{self._id_domain}>"
        for name, value in row.headers.items():
            msg[name] = value
        msg.set_content(row.body)
        return msg

    async def _deliver(self, row: OutboxRow) -> tuple[str, bool] | None:
        """None once the server accepted the message; else (error code, permanent)."""
        t = self._target
        try:
            message = self.message(row).as_bytes(policy=_WIRE)
        except (ValueError, TypeError):  # a row written around enqueue's checks
            return "bad_message", True   # given up, or it would head the queue forever
        try:
            await aiosmtplib.send(
                message, sender=self._envelope_from, recipients=[row.to_address],
                hostname=t.host, port=t.port, use_tls=t.implicit_tls,
                username=t.username, password=t.password, timeout=self._timeout)
        except aiosmtplib.SMTPRecipientsRefused as e:
            code = e.recipients[0].code if e.recipients else 0
            return f"recipient_refused_{code}", 500 <= code < 600
        except aiosmtplib.SMTPResponseException as e:
            return f"smtp_{e.code}", 500 <= e.code < 600
        except aiosmtplib.SMTPConnectError:  # also the connect timeout
            return "connect", False
        except aiosmtplib.SMTPServerDisconnected:
            return "disconnected", False
        except aiosmtplib.SMTPTimeoutError:
            return "timeout", False
        except aiosmtplib.SMTPException as e:
            return f"smtp_{type(e).__name__}", False
        except OSError:
            return "network", False
        return None
