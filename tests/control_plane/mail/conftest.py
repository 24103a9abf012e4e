"""Fixtures for the mail tests: a real ``aiosmtpd`` server process on 127.0.0.1 that
stores what it accepts in a maildir, and an outbox with nothing else due.

The server is started and stopped by its pid (tests/support.ModuleProcess), so a test
can take SMTP down and bring it back on the same port.
"""

from __future__ import annotations

import asyncio
import mailbox
import time
from collections.abc import AsyncIterator, Iterator
from email.message import Message
from pathlib import Path

import asyncpg
import pytest

from control_plane.mail.target import SmtpTarget
from tests.support import ModuleProcess, free_port


class SmtpServer:
    """``python -m aiosmtpd`` with the Mailbox handler; ``messages()`` reads its maildir."""

    def __init__(self, port: int, maildir: Path, log_path: Path) -> None:
        self.port, self.maildir, self._log = port, maildir, log_path
        self._proc: ModuleProcess | None = None
        self.target = SmtpTarget(host="127.0.0.1", port=port, implicit_tls=False)

    async def start(self) -> None:
        self._proc = ModuleProcess(
            "aiosmtpd", ["-n", "-l", f"127.0.0.1:{self.port}",
                         "-c", "aiosmtpd.handlers.Mailbox", str(self.maildir)],
            log_path=self._log)
        deadline = time.monotonic() + 30.0
        while True:  # ready once it accepts a connection and greets
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if self._proc.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"aiosmtpd did not start:\n{self._proc.log_text()}") from None
                await asyncio.sleep(0.05)
                continue
            greeting = await reader.readline()
            writer.close()
            await writer.wait_closed()
            assert greeting.startswith(b"220"), greeting
            return

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def messages(self) -> list[Message]:
        box = mailbox.Maildir(self.maildir, create=False)
        try:
            return [box.get_message(key) for key in box.keys()]
        finally:
            box.close()


@pytest.fixture
def smtp_down(tmp_path: Path) -> Iterator[SmtpServer]:
    """A server on a free port, not started yet: SMTP is down until ``start()``."""
    maildir = tmp_path / "maildir"
    mailbox.Maildir(maildir, create=True).close()
    server = SmtpServer(free_port(), maildir, tmp_path / "aiosmtpd.log")
    yield server
    server.stop()


@pytest.fixture
async def smtp(smtp_down: SmtpServer) -> AsyncIterator[SmtpServer]:
    await smtp_down.start()
    yield smtp_down


@pytest.fixture
async def outbox_pool(pool: asyncpg.Pool) -> asyncpg.Pool:
    """The pool, with rows other tests left due parked, so this test's senders see only
    its own rows (tests share the session database)."""
    await pool.execute(
        "UPDATE email_outbox SET next_attempt_at = NULL WHERE next_attempt_at IS NOT NULL")
    return pool
