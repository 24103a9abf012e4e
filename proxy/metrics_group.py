"""Metrics of a whole process group, and the listener they are served on.

With ``--workers N`` each worker keeps its own plain registry (the hot path pays
nothing for the group: prometheus-client's multiprocess mode, files in mmap, measured
+3.5 to +3.9 µs per request for the same three metric calls, 2.1-2.6 µs → 6.0-6.2 µs,
i.e. ~3.5 % of the 106 µs a request costs) and answers on a Unix socket in a folder
of its instance (``<dir>/<pid>.sock``, the folder made fresh by the supervisor and
removed when it stops, so instances never share one). A scrape of the supervisor's
metrics listener reads every worker's exposition and sums it: counters, histogram
buckets, sums and counts and quantity gauges add up; ``*_created`` takes the
earliest; the state gauges of ``proxy.metrics.MAX_GAUGES`` take the worst.
``qnp_metrics_workers_unreachable`` says how many workers did not answer in time.

The metrics listener is an ``HttpServer`` of its own on ``QNP_METRICS_HOST`` /
``QNP_METRICS_PORT``, never the public port: ``/metrics`` and ``/healthz``, 404 else.

Must not import the handlers, admission, auth, the emitter or Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy import errors
from proxy.http_server import Handler, HttpServer, Reply, Request, StreamReply
from proxy.metrics import MAX_GAUGES

log = logging.getLogger("qnp.proxy.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_OK = b'{"status":"ok"}'
_WORKER_TIMEOUT = 2.0  # seconds a scrape waits for one worker

Render = Callable[[], bytes]


async def serve_socket(path: Path, render: Render) -> asyncio.Server:
    """Answer every connection on the Unix socket ``path`` with ``render()``, then close."""

    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(render())
            await writer.drain()
        except OSError:  # the scraper gave up first: nothing to answer
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_unix_server(answer, path=str(path))


async def read_socket(path: Path) -> str | None:
    """One worker's exposition, or None if it did not answer in time."""
    try:
        async with asyncio.timeout(_WORKER_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                data = await reader.read()  # to EOF: the worker closes when done
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError) as e:
        log.warning("metrics: worker socket %s did not answer (%s)", path.name,
                    type(e).__name__)
        return None
    return data.decode("utf-8", "replace")


def _combine(family: str, old: float, new: float) -> float:
    if family.endswith("_created"):
        return min(old, new)
    if family in MAX_GAUGES:
        return max(old, new)
    return old + new


class _Summed:
    """A registry collector holding already-summed families."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def sum_expositions(texts: Iterable[str], unreachable: int = 0) -> bytes:
    """The Prometheus text exposition of several processes' registries, summed."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            merged = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = merged.get(key)
                merged[key] = s.value if old is None else _combine(fam.name, old, s.value)
    for name, fam in families.items():
        fam.samples = [Sample(sname, dict(labels), value)
                       for (sname, labels), value in values[name].items()]
    missing = Metric("qnp_metrics_workers_unreachable",
                     "Workers whose metrics this scrape could not read.", "gauge")
    missing.add_sample("qnp_metrics_workers_unreachable", {}, float(unreachable))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Summed([*families.values(), missing]))
    return generate_latest(registry)


async def scrape_group(sockets: Sequence[Path]) -> bytes:
    """Every worker's metrics read concurrently and summed into one exposition."""
    texts = await asyncio.gather(*(read_socket(p) for p in sockets))
    answered = [t for t in texts if t is not None]
    return sum_expositions(answered, unreachable=len(texts) - len(answered))


def metrics_dispatcher(render: Callable[[], Awaitable[bytes]]) -> Handler:
    """The metrics listener's routes: ``/metrics`` (``render``), ``/healthz``, else 404."""

    async def dispatch(request: Request) -> Reply | StreamReply:
        if request.method in ("GET", "HEAD"):
            if request.path == "/metrics":
                return Reply(200, await render(), content_type=CONTENT_TYPE)
            if request.path == "/healthz":
                return Reply(200, _OK)
        return errors.error_response(errors.RouteNotFound(), {})

    return dispatch


class MetricsPortTaken(OSError):
    """Another process already listens on the metrics port."""


def _refuse_shared_port(host: str, port: int) -> None:
    """Fail if anything listens on ``host:port`` already.

    ``HttpServer`` binds with ``SO_REUSEPORT`` (workers share the public port), which
    would let a second instance on this host join our metrics port silently, each
    scrape then reaching one of them at random. A bind without it fails instead.
    """
    for family, kind, proto, _name, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                raise MetricsPortTaken(
                    e.errno, f"metrics port {host}:{port} is in use (QNP_METRICS_PORT)"
                ) from None


async def start_listener(host: str, port: int,
                         render: Callable[[], Awaitable[bytes]]) -> tuple[HttpServer, int]:
    """The metrics listener, started; its server and bound port (``0``: any free)."""
    if port != 0:
        _refuse_shared_port(host, port)
    server = HttpServer(
        metrics_dispatcher(render),
        max_body=1024,  # it takes no bodies
        bad_request=errors.error_response(errors.BadRequest("Malformed HTTP request."), {}),
        internal_error=errors.error_response(errors.Internal(), {}),
    )
    return server, await server.start(host, port)
