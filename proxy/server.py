"""Running the proxy: one worker's serve loop, and the supervisor of several workers.

Workers are separate processes that each bind the same port with ``SO_REUSEPORT``,
so the kernel spreads connections across them. SIGTERM (or Ctrl-C) stops accepting,
lets open requests and streams finish for up to the grace period, then flushes events.

Metrics are served on a listener of their own (``QNP_METRICS_HOST``/``_PORT``), never
on the public port: by the worker itself when it runs alone, else by the supervisor,
which sums its workers' registries (``proxy.metrics_group``) for each scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy import errors
from proxy.app import METRICS, build_app, dispatcher, head_check
from proxy.http_server import HttpLimits, HttpServer
from proxy.metrics_group import MetricsPortTaken, scrape_group, serve_socket, start_listener
from proxy.settings import METRICS_SOCKET_DIR, Settings, environment
from proxy.tls import TlsError, server_context

log = logging.getLogger("qnp.proxy")


@dataclass(frozen=True, slots=True)
class Running:
    """A started proxy: its resources (``app``), server and bound port, and where its
    metrics are served (``metrics_port`` None: off, or by the supervisor's listener)."""

    app: web.Application
    server: HttpServer
    port: int
    metrics_server: HttpServer | None = None
    metrics_port: int | None = None
    metrics_socket: asyncio.Server | None = None

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for ``grace`` seconds, then
        close the resources (events flushed or spooled)."""
        try:
            await self.server.shutdown(grace)
        finally:
            try:
                if self.metrics_server is not None:
                    await self.metrics_server.shutdown(0.5)
                if self.metrics_socket is not None:
                    self.metrics_socket.close()
            finally:
                await self.app.cleanup()


async def start(settings: Settings) -> Running:
    """Open the resources and start listening; the caller ends it with ``stop()``."""
    tls = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        tls = server_context(settings.tls_cert, settings.tls_key)  # before Redis: fail fast
    app = build_app(settings)
    # As aiohttp's AppRunner does: its startup signal frozen, then the app once started.
    app.on_startup.freeze()
    await app.startup()  # Redis, emitter, auth, admission, upstream pool: see app.py
    app.freeze()
    try:
        server = HttpServer(
            dispatcher(app),
            max_body=settings.max_body_bytes,
            bad_request=errors.error_response(errors.BadRequest("Malformed HTTP request."), {}),
            internal_error=errors.error_response(errors.Internal(), {}),
            limits=HttpLimits(
                head_timeout=settings.http_head_timeout,
                min_body_rate=settings.http_min_body_rate,
                body_rate_window=settings.http_body_rate_window,
                max_connections=settings.http_max_connections or None,
                max_connections_per_ip=settings.http_max_connections_per_ip or None,
                max_buffered_body=settings.http_max_buffered_body,
            ),
            trusted_proxies=settings.trusted_proxies,
            head_check=head_check(app),
            on_reject=app[METRICS].rejected,
        )
        port = await server.start(settings.host, settings.port, tls=tls)
    except BaseException:
        await app.cleanup()
        raise
    try:
        render = app[METRICS].render
        if settings.metrics_socket_dir is not None:  # a worker: the supervisor scrapes it
            path = settings.metrics_socket_dir / f"{os.getpid()}.sock"
            return Running(app, server, port, metrics_socket=await serve_socket(path, render))
        if settings.metrics_port is None:
            return Running(app, server, port)

        async def own() -> bytes:
            return render()

        listener, metrics_port = await start_listener(settings.metrics_host,
                                                      settings.metrics_port, own)
        return Running(app, server, port, listener, metrics_port)
    except BaseException:
        await Running(app, server, port).stop(0)
        raise


async def serve(settings: Settings) -> None:
    running = await start(settings)
    if settings.gc_threshold:
        _tune_gc(settings.gc_threshold)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if settings.tls_cert is not None else "http"
    log.info("proxy listening on %s://%s:%d (node %s)", scheme, settings.host, running.port,
             settings.node_id)
    if running.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host,
                 running.metrics_port)
    await stop.wait()
    log.info("shutting down: no new connections; open requests have %.0fs",
             settings.shutdown_grace)
    await running.stop(settings.shutdown_grace)
    log.info("proxy stopped")


def _tune_gc(young: int) -> None:
    """Fewer cyclic-GC passes over the objects of open streams.

    With Python's defaults a worker holding thousands of open streams ran full
    collections often enough to stall every relay for tens to hundreds of ms (measured:
    TTFT p99 +840 ms, inter-chunk gap p99 +31 ms at ~2,800 open paced streams; +30 ms
    and +3 ms with this). What start-up built (modules, catalog, pools) is frozen out of
    collections; the young generation collects every ``young`` allocations. Memory stays
    bounded: the interpreter still runs a full collection once long-lived objects have
    grown by a quarter (the soak benchmark measures RSS growth).
    """
    gc.freeze()
    gc.set_threshold(young, 50, 1000)


def run_worker(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
    )
    try:
        try:
            import uvloop
        except ImportError:  # uvloop has no Windows build; asyncio's loop still works
            asyncio.run(serve(settings))
        else:
            uvloop.run(serve(settings))
    except MetricsPortTaken as e:  # a configuration error: one line, not a traceback
        log.error("%s", e.strerror)
        return 1
    except TlsError as e:  # so is a certificate that does not load
        log.error("%s", e)
        return 1
    return 0


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.workers`` worker processes and relay SIGTERM/SIGINT to them.

    Each worker is ``python -m proxy <same arguments> --workers 1``; if one dies, the
    others are stopped too and the exit status says so, for the process manager to act.
    The supervisor serves the group's metrics listener meanwhile.
    """
    if settings.workers == 1:
        return run_worker(settings)
    if settings.port == 0:
        log.error("--workers > 1 needs a fixed --port")
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
    )
    # This instance's own folder, fresh: a scrape never reads another instance's workers.
    sockets = Path(tempfile.mkdtemp(prefix="qnp-metrics-"))
    try:
        cmd = [sys.executable, "-m", "proxy", *argv, "--workers", "1"]
        env = {**environment(), METRICS_SOCKET_DIR: str(sockets)}
        # Our own interpreter and our own command line: nothing untrusted is executed.
        procs = [subprocess.Popen(cmd, env=env) for _ in range(settings.workers)]  # noqa: S603
        return asyncio.run(_supervise(settings, procs, sockets))
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


async def _supervise(settings: Settings, procs: list[subprocess.Popen[bytes]],
                     sockets: Path) -> int:
    stopping = asyncio.Event()

    def relay() -> None:
        stopping.set()
        for p in procs:
            if p.poll() is None:
                p.terminate()  # SIGTERM: each worker drains gracefully

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay)
    listener: HttpServer | None = None
    failed = 0
    try:
        if settings.metrics_port is not None:

            async def group() -> bytes:
                return await scrape_group([sockets / f"{p.pid}.sock" for p in procs])

            listener, port = await start_listener(settings.metrics_host,
                                                  settings.metrics_port, group)
            log.info("metrics of %d workers on http://%s:%d/metrics", len(procs),
                     settings.metrics_host, port)
        while not stopping.is_set() and all(p.poll() is None for p in procs):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.2)
    except OSError as e:  # the metrics port is taken: stop the workers, say so
        log.error("cannot serve metrics on %s:%s: %s", settings.metrics_host,
                  settings.metrics_port, e)
        failed = 1
    finally:
        if not stopping.is_set():
            if not failed:
                log.error("a worker exited; stopping the others")
            relay()
        codes = await asyncio.gather(*(asyncio.to_thread(p.wait) for p in procs))
        if listener is not None:
            await listener.shutdown(0.5)
    return max(failed, *(abs(c) for c in codes))
