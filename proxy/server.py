"""Running the proxy: one worker's serve loop, and the supervisor of several workers.

Workers are separate processes that each bind the same port with ``SO_REUSEPORT``,
so the kernel spreads connections across them. SIGTERM (or Ctrl-C) stops accepting,
lets open requests and streams finish for up to the grace period, then flushes events.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import sys
from collections.abc import Mapping

from aiohttp import web

from proxy import settings as settings_mod
from proxy.app import build_app
from proxy.settings import CommandLine, Settings

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


def _worker_main(env: dict[str, str], cli: CommandLine) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor relays Ctrl-C as SIGTERM
    run_worker(settings_mod.load(env, cli))


def supervise(settings: Settings, env: Mapping[str, str], cli: CommandLine) -> int:
    """Start ``settings.workers`` processes and relay SIGTERM/SIGINT to them."""
    if settings.workers == 1:
        run_worker(settings)
        return 0
    if settings.port == 0:
        log.error("--workers > 1 needs a fixed --port")
        return 2
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(dict(env), cli), name=f"proxy-worker-{i}")
        for i in range(settings.workers)
    ]
    for p in procs:
        p.start()

    def relay(_sig: int, _frame: object) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: each worker drains gracefully

    signal.signal(signal.SIGTERM, relay)
    signal.signal(signal.SIGINT, relay)
    for p in procs:
        p.join()
    return max((p.exitcode or 0) for p in procs)
