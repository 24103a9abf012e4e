"""Owns every resource with a lifetime, and which request goes where.

Redis pool, upstream connection pool, emitter task and key-change watcher are opened
and closed in aiohttp ``cleanup_ctx`` generators and kept in typed ``AppKey``s (the
``web.Application`` is only their container: requests are served by
``proxy.http_server``); there is no module state. ``dispatcher`` routes requests;
response bodies that never vary (model list, health) are encoded there, once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable

import orjson
import redis.asyncio as aioredis
from aiohttp import web

from proxy import errors
from proxy.admission import Admission, AdmissionConfig
from proxy.auth import Authenticator
from proxy.catalog import model_object
from proxy.connections import ConnectionPool
from proxy.emitter import EventEmitter
from proxy.handlers import ROUTES, ChatHandler, Endpoint
from proxy.http_server import Handler, HeadCheck, Reply, Request, StreamReply
from proxy.metrics import Metrics
from proxy.routing import Router
from proxy.settings import Settings
from proxy.spool import Spool
from proxy.tasks import stop_task
from proxy.tls import RedisTls, redis_options
from proxy.upstream import UpstreamClient

log = logging.getLogger("qnp.proxy")

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
REDIS = web.AppKey("redis", aioredis.Redis)
EMITTER = web.AppKey("emitter", EventEmitter)
AUTH = web.AppKey("auth", Authenticator)
ADMISSION = web.AppKey("admission", Admission)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
WATCHING = web.AppKey("watching", asyncio.Event)
_HANDLER = web.AppKey("handler", ChatHandler)


_OK = b'{"status":"ok"}'
_NOT_READY = b'{"status":"unavailable","reason":"redis"}'


def connect_redis(url: str, max_connections: int = 64,
                  tls: RedisTls | None = None) -> aioredis.Redis:
    """The proxy's Redis client: a bounded pool that makes callers wait for a free
    connection (a full pool is load, not an outage) and short timeouts (a dead Redis
    must fail fast so admission can degrade instead of stalling requests). A
    ``rediss://`` URL connects over TLS, verified with ``tls`` (``proxy.tls``)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=2.0,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=15,
        **redis_options(url, tls or RedisTls()),
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = connect_redis(settings.redis_url, tls=settings.redis_tls)
    app[REDIS] = client
    yield
    await client.aclose()


async def _emitter_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]
    spool = _open_spool(settings)
    emitter = EventEmitter(
        app[REDIS],
        settings.redis_names.event_streams(settings.event_shards),
        max_buffer=settings.event_queue_max,
        batch_size=settings.event_batch,
        flush_interval=settings.event_flush_interval,
        spool=spool,
        stream_max_len=settings.event_stream_max_len,
        on_sent=metrics.events_emitted.inc,
        on_dropped=metrics.events_dropped.inc,
        on_spooled=metrics.events_spooled.inc,
        on_replayed=metrics.events_replayed.inc,
    )
    metrics.events_buffered.set_function(lambda: len(emitter))
    metrics.events_in_spool.set_function(lambda: emitter.spooled)
    app[EMITTER] = emitter
    tasks = {asyncio.create_task(emitter.run(), name="event-emitter"),
             asyncio.create_task(emitter.replay(), name="event-replay")}
    yield
    # Runs after the server has stopped taking requests and open ones have finished.
    # Let the loops finish the batch in flight rather than cancel it mid-XADD (which
    # would send those events twice), then flush (or spool) the rest.
    emitter.stop()
    _, pending = await asyncio.wait(tasks, timeout=5.0)
    for task in pending:
        await stop_task(task)
    await emitter.close(deadline=5.0)


def _open_spool(settings: Settings) -> Spool | None:
    spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes)
    try:
        spool.open()
    except OSError as e:
        log.error("no event spool at %s (%s): events wait in memory while Redis is down",
                  settings.spool_dir, e)
        return None
    return spool


async def _auth_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    auth = Authenticator(
        app[REDIS], settings.redis_names,
        ttl=settings.key_cache_ttl, max_entries=settings.key_cache_size,
        on_throttled=app[METRICS].auth_throttled,
    )
    app[AUTH] = auth
    watching = asyncio.Event()
    app[WATCHING] = watching
    task = asyncio.create_task(auth.watch_changes(watching), name="key-changes")
    yield
    await stop_task(task)


async def _admission_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]
    admission = Admission(
        app[REDIS], settings.redis_names,
        AdmissionConfig(
            window_ms=settings.rate_window_ms,
            enabled=settings.admission,
            policy=settings.degraded_policy,
            fleet_processes=settings.fleet_processes,
            degraded_fraction=settings.degraded_fraction,
        ),
        on_degraded=lambda degraded: metrics.admission_degraded.set(int(degraded)),
    )
    app[ADMISSION] = admission
    tasks = [asyncio.create_task(admission.probe(), name="admission-probe"),
             asyncio.create_task(admission.run_settlements(), name="settlements")]
    yield
    for task in tasks:
        await stop_task(task)
    await admission.close(deadline=5.0)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pool = ConnectionPool(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        keepalive=30.0,
        # A stream whose client reads slowly parks at most this much here (the socket
        # is not read meanwhile), keeping each such stream well under 1 MB.
        buffer_limit=2**16,
    )
    app[UPSTREAM] = UpstreamClient(pool, first_byte_timeout=settings.first_byte_timeout)
    yield
    pool.close()


def build_app(settings: Settings) -> web.Application:
    """The resources (opened by ``app.startup()``, closed by ``app.cleanup()``); the
    HTTP server (``proxy.http_server``) serves ``dispatcher(app)`` in front of them."""
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend([_redis_ctx, _emitter_ctx, _auth_ctx, _admission_ctx, _upstream_ctx])

    async def handler_ctx(app: web.Application) -> AsyncIterator[None]:
        app[_HANDLER] = ChatHandler(settings, app[AUTH], app[ADMISSION], app[UPSTREAM],
                                    app[EMITTER], app[METRICS], Router(settings.routing))
        yield

    app.cleanup_ctx.append(handler_ctx)
    return app


_PREFIX_ROUTE = "/{call}"  # a route ending in this matches any one path segment after it


class _Endpoints:
    """The public API routes, compiled once: exact paths, then one-segment prefixes."""

    def __init__(self) -> None:
        self._exact: dict[str, Endpoint] = {}
        self._prefixed: list[tuple[str, Endpoint]] = []
        for path, endpoint in ROUTES:
            if path.endswith(_PREFIX_ROUTE):
                self._prefixed.append((path[: -len(_PREFIX_ROUTE)] + "/", endpoint))
            else:
                self._exact[path] = endpoint

    def find(self, request: Request) -> Endpoint | None:
        endpoint = self._exact.get(request.path)
        if endpoint is not None:
            return endpoint
        for prefix, candidate in self._prefixed:
            rest = request.path[len(prefix):]
            if request.path.startswith(prefix) and rest and "/" not in rest:
                request.match_info["call"] = rest
                return candidate
        return None


def dispatcher(app: web.Application) -> Handler:
    """Every request's answer: the public APIs, the model list and health;
    405 for a known path and another method, 404 in the OpenAI format for the rest."""
    settings, chat, endpoints = app[SETTINGS], app[_HANDLER], _Endpoints()
    # OpenAI's model list, each entry also OpenRouter's model object (catalog.model_object).
    models_body = orjson.dumps({
        "object": "list",
        "data": [model_object(name, m) for name, m in settings.catalog.models.items()],
    })

    async def models() -> Reply:
        return Reply(200, models_body)

    async def healthz() -> Reply:
        return Reply(200, _OK)

    async def readyz() -> Reply:
        # Exercise the admission script itself, not just PING: a Redis that answers
        # but cannot run it (no scripting, wrong server) is not ready for traffic.
        if not await app[ADMISSION].ready():
            return Reply(503, _NOT_READY)
        return Reply(200, _OK)

    # /metrics is not here: it has a listener of its own (proxy.metrics_group), so the
    # public port shows no traffic figures and costs no scrape CPU to strangers.
    # /api/v1/models too: OpenRouter's clients list models under its /api/v1 base.
    gets = {"/v1/models": models, "/api/v1/models": models, "/healthz": healthz,
            "/readyz": readyz}

    async def dispatch(request: Request) -> Reply | StreamReply:
        endpoint = endpoints.find(request)
        if endpoint is not None:
            if request.method == "POST":
                return await chat.serve(request, endpoint)
            return errors.error_response(errors.MethodNotAllowed(), {})
        get = gets.get(request.path)
        if get is not None and request.method in ("GET", "HEAD"):
            return await get()
        return errors.error_response(errors.RouteNotFound(), {})

    return dispatch


def head_check(app: web.Application) -> HeadCheck:
    """The server's early check, once a request's head is in: an API request's key is
    verified before its body is read (refused: the body never is); other routes pass."""
    chat, endpoints = app[_HANDLER], _Endpoints()

    def check(request: Request) -> bool | Awaitable[bool]:
        if request.method != "POST" or endpoints.find(request) is None:
            return True
        return chat.check_head(request)

    return check
