"""The bar the proxy is measured against: the barest aiohttp passthrough we could write.

Owns: an aiohttp server on uvloop that relays any ``POST`` (and ``GET /v1/models``) to
the upstream with the same path and query, the credential and content-type headers, and
nothing else; it answers with the upstream's status and content type and relays the body
as it arrives (``iter_any`` to ``StreamResponse.write``). One ``ClientSession`` per
process. No auth, limits, accounting or translation: whatever the proxy costs beyond
this is the price of its features. Deliberately not optimised beyond that.

Must not import ``proxy``, ``control_plane`` or ``devstack``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import aiohttp
import uvloop
from aiohttp import web

from benchmarks.processes import prepare_process, supervise, watch_parent

_READY = "passthrough ready on http://{host}:{port}"
_FORWARDED = ("Authorization", "x-api-key", "x-goog-api-key", "anthropic-version",
              "Content-Type")
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


async def _session(app: web.Application) -> AsyncIterator[None]:
    # No connection cap (aiohttp's default is 100): the bar must not queue requests the
    # proxy would send at once.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False) as session:
        app[SESSION] = session
        yield


async def relay(request: web.Request) -> web.StreamResponse:
    headers = {name: request.headers[name] for name in _FORWARDED if name in request.headers}
    url = request.app[UPSTREAM] + request.path_qs
    try:
        upstream = await request.app[SESSION].request(
            request.method, url, headers=headers, data=await request.read())
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.json_response({"error": {"message": f"upstream unreachable: {exc!r}",
                                            "type": "bad_gateway"}}, status=502)
    async with upstream:
        response = web.StreamResponse(status=upstream.status)
        if "Content-Type" in upstream.headers:
            response.headers["Content-Type"] = upstream.headers["Content-Type"]
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        # A client that leaves ends the relay; the upstream connection is dropped with it.
        with contextlib.suppress(ConnectionResetError):
            async for data in upstream.content.iter_any():
                await response.write(data)
            await response.write_eof()
        return response


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def build_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/models", relay)
    app.router.add_post("/{tail:.*}", relay)
    return app


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if args.parent_pid is not None:
        watch_parent(loop, args.parent_pid, stop.set)
    runner = web.AppRunner(build_app(args.upstream), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port, reuse_port=True, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        print(_READY.format(host=args.host, port=port), flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.passthrough",
                                     description="A bare aiohttp passthrough, the bar.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--cpus", help="pin to these CPUs, e.g. 0 or 0-3 (workers too)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    prepare_process(args.cpus)
    if args.workers > 1:
        return supervise("benchmarks.passthrough", [*raw, "--workers", "1"], args.workers,
                         args.host, args.port, _READY)
    uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
