"""``serve``: the admin API and the ingest consumer in one process, until a signal.

SIGTERM or SIGINT stops accepting requests, lets the ingest task finish its batch and
closes the stores. Runs on uvloop. Expects migrations to have been applied. Never
imports ``proxy``.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop
from aiohttp import web

from control_plane.admin_api import make_app
from control_plane.settings import Settings

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    runner = web.AppRunner(make_app(settings), handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.admin_host, settings.admin_port)
        await site.start()
        log.info("admin API listening host=%s port=%d", settings.admin_host, settings.admin_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def run(settings: Settings) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings))
