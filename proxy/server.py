"""Running the proxy: one worker's serve loop, and the supervisor of several workers.

Workers are separate processes that each bind the same port with ``SO_REUSEPORT``,
so the kernel spreads connections across them. SIGTERM (or Ctrl-C) stops accepting,
lets open requests and streams finish for up to the grace period, then flushes events.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from aiohttp import web

from proxy.app import build_app
from proxy.settings import Settings

log = logging.getLogger("qnp.proxy")


async def start(settings: Settings) -> web.AppRunner:
    """Build the app and start listening; the caller ends it with ``runner.cleanup()``."""
    runner = web.AppRunner(
        build_app(settings),
        handle_signals=False,
        shutdown_timeout=settings.shutdown_grace,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        access_log=None,  # one event per request is the record; no per-request log line
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_port=True, backlog=4096)
    await site.start()
    return runner


async def serve(settings: Settings) -> None:
    runner = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("proxy listening on http://%s:%d (node %s)", settings.host, settings.port,
             settings.node_id)
    await stop.wait()
    log.info("shutting down: no new connections; open requests have %.0fs",
             settings.shutdown_grace)
    await runner.cleanup()
    log.info("proxy stopped")


def run_worker(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop
    except ImportError:  # uvloop has no Windows build; asyncio's loop still works
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.workers`` worker processes and relay SIGTERM/SIGINT to them.

    Each worker is ``python -m proxy <same arguments> --workers 1``; if one dies, the
    others are stopped too and the exit status says so, for the process manager to act.
    """
    if settings.workers == 1:
        run_worker(settings)
        return 0
    if settings.port == 0:
        log.error("--workers > 1 needs a fixed --port")
        return 2
    cmd = [sys.executable, "-m", "proxy", *argv, "--workers", "1"]
    # Our own interpreter and our own command line: nothing untrusted is executed.
    procs = [subprocess.Popen(cmd) for _ in range(settings.workers)]  # noqa: S603
    stopping = False

    def relay(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.terminate()  # SIGTERM: each worker drains gracefully

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    while not stopping and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    if not stopping:
        log.error("a worker exited; stopping the others")
        relay(signal.SIGTERM, None)
    return max(abs(p.wait()) for p in procs)
