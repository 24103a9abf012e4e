"""Process plumbing the benchmark's servers and load generator share: CPU lists as
``taskset -c`` writes them, pinning, the descriptor limit, and several worker
processes on one port (``SO_REUSEPORT``) under one supervisor.

Must not import ``proxy`` or ``control_plane``.
"""

from __future__ import annotations

import asyncio
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

_START_TIMEOUT = 30.0  # seconds a supervised worker has to start listening


def parse_cpus(text: str) -> list[int]:
    """``"1"``, ``"0,2"`` or ``"0-3"`` (as ``taskset -c`` takes them) → sorted CPUs."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return sorted(cpus)


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one: thousands of connections need thousands
    of descriptors (two per stream in a proxy), and children inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def prepare_process(cpus: str | None) -> None:
    """Pin this process (and the children it starts) and allow as many sockets as the
    hard limit does: thousands of connections need thousands of descriptors."""
    if cpus:
        os.sched_setaffinity(0, parse_cpus(cpus))
    raise_fd_limit()


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket that other processes may bind too."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def watch_parent(loop: asyncio.AbstractEventLoop, parent: int, stop: Callable[[], None]) -> None:
    """Stop a worker whose supervisor died without stopping it (killed with SIGKILL)."""
    if os.getppid() != parent:
        stop()
        return
    loop.call_later(1.0, watch_parent, loop, parent, stop)


def supervise(module: str, worker_argv: Sequence[str], processes: int, host: str, port: int,
              ready: str) -> int:
    """Run ``processes`` workers (``python -m module *worker_argv``, each told the port
    and our pid) on one port; print ``ready`` (formatted with host and port) once every
    one of them listens, relay SIGTERM/SIGINT to them, and stop them all if one dies.
    Each worker must print one line to stdout when it listens."""
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Holding the port bound (never listening, so it takes no connections) keeps port 0
    # meaningful: every worker joins the port this socket got.
    with reuseport_socket(host, port) as holder:
        port = holder.getsockname()[1]
        cmd = [sys.executable, "-m", module, *worker_argv, "--port", str(port),
               "--parent-pid", str(os.getpid())]
        # Our own interpreter and our own command line: nothing untrusted is executed.
        workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
                   for _ in range(processes)]
        try:
            if _await_ready(workers, lambda: stopping):
                print(ready.format(host=host, port=port), flush=True)
                while not stopping and all(w.poll() is None for w in workers):
                    time.sleep(0.2)
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
            codes = [worker.wait() for worker in workers]
            for worker in workers:
                if worker.stdout is not None:
                    worker.stdout.close()
    return 0 if stopping else max(1, *(abs(c) for c in codes))


def _await_ready(workers: Sequence[subprocess.Popen[bytes]],
                 stopping: Callable[[], bool]) -> bool:
    """Wait for each worker's ready line on its stdout; False if one died or we stop."""
    waiting = {w.stdout.fileno(): w for w in workers if w.stdout is not None}
    deadline = time.monotonic() + _START_TIMEOUT
    with selectors.DefaultSelector() as selector:
        for fd in waiting:
            selector.register(fd, selectors.EVENT_READ)
        while waiting and not stopping() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                line = os.read(key.fd, 4096)
                if not line:  # EOF: the worker exited before listening
                    return False
                selector.unregister(key.fd)
                del waiting[key.fd]
    return not waiting and not stopping()
