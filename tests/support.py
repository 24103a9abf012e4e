"""Helpers shared by tests: free ports, waiting for an HTTP endpoint, and running a
``python -m ...`` service as a real subprocess whose output lands in a log file."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ModuleProcess:
    """``python -m <module> <args>`` in the project venv, stdout+stderr into ``log_path``.

    Stopped by its pid only (SIGTERM, then SIGKILL after ``stop_timeout``). Use as a
    context manager, or call ``stop()``; it is idempotent.
    """

    def __init__(
        self,
        module: str,
        args: Sequence[str] = (),
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=dict(os.environ if env is None else env),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 30.0) -> str:
        """Block until ``needle`` appears in the log; return the log. Fails with the log
        if the process exits first or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"exited with {self.proc.returncode} before {needle!r}:\n{text}"
                )
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the log after {timeout} s:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, stop_timeout: float = 15.0) -> int:
        """Signal the process, wait for it, and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> ModuleProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def wait_for_http(
    url: str, timeout: float = 30.0, *, expect_status: int | None = None
) -> int:
    """Poll ``url`` with GET until it answers (with ``expect_status`` if given); return
    the status. Connection errors count as not ready yet."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            try:
                async with session.get(url) as response:
                    if expect_status is None or response.status == expect_status:
                        return response.status
            except (TimeoutError, aiohttp.ClientError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout} s")
            await asyncio.sleep(0.05)


def process_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in {"Z", "X"}
    except FileNotFoundError:
        return True


def wait_until_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return process_gone(pid)
