"""HTTP/1.1 load generator: closed loop (N connections, each sending its next request when
the previous one is back) or open loop (requests due at a fixed rate), with latency
histograms and errors by kind. Owns its minimal HTTP/1.1 client (asyncio Protocol +
httptools, request bytes built once), scheduling, timeouts, splitting a run over
processes and merging their results, and the CLI. It must never be what limits a
benchmark, so the hot path is callbacks, not tasks.

Open loop avoids coordinated omission: one scheduler sends each request when due, and
``latency`` counts from the due time, so a stalled server is charged for every request
queued behind it (timer lateness, ~50 µs, too); ``service`` counts from the send. A run
is bounded by its duration, request budget, per-request timeout, and a grace after which
requests still out count as ``timeout``.

Must not import ``proxy`` or ``control_plane`` (it measures them from outside).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import multiprocessing
import os
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from time import perf_counter
from typing import cast
from urllib.parse import urlsplit

import httptools
import orjson
import uvloop

from benchmarks.histogram import HISTOGRAMS
from benchmarks.histogram import LoadResult as LoadResult  # part of this module's API
from benchmarks.processes import parse_cpus, raise_fd_limit

Progress = Callable[[int, float], None]  # (measured requests done, seconds since start)
_RECONNECT_DELAY = 0.05  # closed loop against a refusing server: do not spin
_BATCH = 256  # an open-loop scheduler that falls behind still lets I/O in this often


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One run against one URL; the fields mirror the command-line flags."""

    url: str
    body: bytes = b""  # empty: a GET
    headers: tuple[tuple[str, str], ...] = ()
    concurrency: int | None = None  # closed loop
    rate: float | None = None  # open loop, requests per second
    connections: int = 4096  # open loop: most connections it may open
    duration: float = 10.0  # seconds measured, after the warmup
    warmup: float = 0.0
    max_requests: int | None = None  # measured requests, at most
    stream: bool = False
    end_marker: str = "data: [DONE]"  # a stream without it is `truncated`; "" = no check
    processes: int = 1
    cpus: str | None = None  # e.g. "1", "0,2" or "2-3"
    timeout: float = 30.0
    grace: float = 5.0  # after the duration, how long outstanding requests may finish
    ca: str | None = None  # https: the CA file to trust (None: the system's)

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open)")
        if urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"only http:// and https:// URLs are supported: {self.url}")
        if (self.concurrency or 1) < 1 or (self.rate or 1) <= 0 or self.processes < 1:
            raise ValueError("concurrency, rate and processes must be positive")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency is not None else "open"


def build_request(spec: LoadSpec) -> bytes:
    """The request's bytes, once for the whole run."""
    url = urlsplit(spec.url)
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    names = {name.lower() for name, _ in spec.headers}
    lines = [f"{'POST' if spec.body else 'GET'} {target} HTTP/1.1"]
    if "host" not in names:
        lines.append(f"Host: {url.netloc.rpartition('@')[2]}")
    if spec.body and "content-type" not in names:
        lines.append("Content-Type: application/json")
    if spec.body:
        lines.append(f"Content-Length: {len(spec.body)}")
    lines += [f"{name}: {value}" for name, value in spec.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + spec.body


class _Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None  # while connecting
        self.retired = self.busy = self.measured = self.found = False
        self.due = self.sent = self.first = self.last = self.arrived = 0.0
        self.tail = b""  # a stream's last bytes, for an end marker split across reads

    def send(self, due: float, now: float) -> None:
        self.busy, self.due, self.measured = True, due, due >= self.run.measure_from
        self.first, self.found, self.tail = 0.0, False, b""
        if self.transport is not None:
            self.sent = now
            self.transport.write(self.run.request)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.run.transports += 1
        if self.busy:
            self.sent = perf_counter()
            self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        self.arrived = perf_counter()  # for on_body; cheaper here than in a subclass copy
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            raise  # our own bug in a callback, not the server's
        except httptools.HttpParserError:
            self.run.lost(self, "reset")

    def on_message_complete(self) -> None:
        self.run.complete(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.lost(self, "truncated" if self.first and self.run.stream else "reset")
        self.run.closed_one()


class _StreamConnection(_Connection):
    """Also times the body's arrivals and looks for the end marker (httptools calls
    ``on_body`` only on protocols that define it, so non-stream runs skip all this)."""

    def on_body(self, body: bytes) -> None:
        arrived = self.arrived
        if not self.first:
            self.first = arrived
        elif arrived != self.last and self.measured:
            self.run.gap.record(arrived - self.last)
        self.last = arrived
        if not self.found:
            marker = self.run.marker
            keep = len(marker) - 1
            if marker in body or (keep and marker in self.tail + body[:keep]):
                self.found = True
            elif keep:
                self.tail = (self.tail + body)[-keep:] if len(body) < keep else body[-keep:]


class _Run:
    """The state of one run in one process; the connections' callbacks land here."""

    def __init__(self, spec: LoadSpec, progress: Progress | None) -> None:
        url = urlsplit(spec.url)
        self.spec, self.progress, self.loop = spec, progress, asyncio.get_running_loop()
        self.host = url.hostname or "127.0.0.1"
        # https: one client context for the run; handshakes happen once per connection
        # (they are kept alive), so a run measures TLS's steady cost, as Cloudflare's
        # kept-alive origin connections see it.
        self.tls = ssl.create_default_context(cafile=spec.ca) if url.scheme == "https" \
            else None
        self.port = url.port or (443 if self.tls else 80)
        self.request, self.stream = build_request(spec), spec.stream
        self.marker = spec.end_marker.encode()
        self.closed_loop = spec.concurrency is not None
        self.factory = _StreamConnection if spec.stream else _Connection
        self.result = LoadResult(spec.mode, spec.concurrency, spec.rate, 1, spec.duration)
        self.latency, self.service, self.ttft, self.gap, self.total = (
            self.result.histograms[name] for name in HISTOGRAMS)
        self.conns: set[_Connection] = set()  # open or connecting, not retired
        self.idle: list[_Connection] = []
        self.pending: deque[float] = deque()  # open loop: due times waiting for a connection
        self.tasks: set[asyncio.Task[None]] = set()  # connecting; held so none is collected
        self.statuses: dict[int, str] = {}
        self.transports = self.inflight = self.done = 0
        self.budget = spec.max_requests if spec.max_requests is not None else 1 << 62
        self.start = perf_counter()
        self.measure_from = self.start + spec.warmup
        self.stop_at = self.measure_from + spec.duration
        self.last_outcome = 0.0
        self.sending = True
        self.quiet: asyncio.Future[None] = self.loop.create_future()  # all sent and back
        self.all_closed: asyncio.Future[None] | None = None  # once tearing down
        self.timer: _Timer | None = None  # open loop
        self.issued = 0  # open loop: requests the scheduler has sent

    def dispatch(self, conn: _Connection | None, due: float, now: float) -> None:
        """Send a request due at ``due`` on ``conn``, an idle connection or a new one."""
        if due >= self.measure_from:
            self.result.sent += 1
            self.budget -= 1
        if conn is None and self.idle:
            conn = self.idle.pop()
        if conn is not None or self.closed_loop or len(self.conns) < self.spec.connections:
            self.place(conn, due, now)
        else:
            self.pending.append(due)

    def place(self, conn: _Connection | None, due: float, now: float) -> None:
        """Send on ``conn``, or on a new connection when None."""
        self.inflight += 1
        if conn is not None:
            conn.send(due, now)
            return
        conn = self.factory(self)
        conn.send(due, due)
        self.conns.add(conn)
        conn.task = self.loop.create_task(self._connect(conn))
        self.tasks.add(conn.task)
        conn.task.add_done_callback(self.tasks.discard)

    async def _connect(self, conn: _Connection) -> None:
        try:
            await self.loop.create_connection(lambda: conn, self.host, self.port,
                                              ssl=self.tls)
        except OSError:
            if not conn.retired:
                self.retire(conn)
                self.finish(conn, "connect")
                if self.closed_loop:
                    self.loop.call_later(_RECONNECT_DELAY, self.next, None)
                else:
                    self.next(None)
        finally:
            conn.task = None

    def next(self, conn: _Connection | None) -> None:
        """``conn`` (or, when None, a connection that is gone) is free: what comes next."""
        now = perf_counter()
        if self.closed_loop:
            if self.sending and (now >= self.stop_at
                                 or (now >= self.measure_from and self.budget <= 0)):
                self.sending = False
            if self.sending:
                self.dispatch(conn, now, now)
                return
        elif self.pending:
            self.place(conn, self.pending.popleft(), now)
            return
        if conn is not None:
            self.idle.append(conn)
        self.check_quiet()

    def complete(self, conn: _Connection) -> None:
        if not conn.busy:  # a response nobody asked for
            self.retire(conn)
            return
        status = conn.parser.get_status_code()
        if 200 <= status < 300:
            error = None if conn.found or not self.stream or not self.marker else "truncated"
        else:
            error = self.statuses.setdefault(status, f"HTTP {status}")
        self.finish(conn, error)
        if conn.parser.should_keep_alive():
            self.next(conn)
        else:
            self.retire(conn)
            self.next(None)

    def lost(self, conn: _Connection, error: str) -> None:
        """The connection closed, or sent what is not HTTP."""
        if conn.retired:
            return
        busy = conn.busy
        self.retire(conn)
        if busy:
            self.finish(conn, error)
            self.next(None)
        elif conn in self.idle:
            self.idle.remove(conn)

    def finish(self, conn: _Connection, error: str | None) -> None:
        """Record the outcome of ``conn``'s request."""
        conn.busy = False
        self.inflight -= 1
        if not conn.measured:
            return
        now = self.last_outcome = perf_counter()
        self.done += 1
        if error is not None:
            self.result.errors[error] = self.result.errors.get(error, 0) + 1
            return
        self.result.ok += 1
        latency = now - conn.due
        self.latency.record(latency)
        self.service.record(now - conn.sent)
        if self.stream:
            self.total.record(latency)
            if conn.first:
                self.ttft.record(conn.first - conn.due)

    def expire(self, dues: list[float]) -> None:
        """Requests that waited for a connection past their timeout, or the end."""
        count = sum(due >= self.measure_from for due in dues)
        if count:
            self.last_outcome = perf_counter()
            self.done += count
            self.result.errors["timeout"] = self.result.errors.get("timeout", 0) + count

    def retire(self, conn: _Connection) -> None:
        """Stop using ``conn`` and close it: abruptly if a request is still in flight."""
        conn.retired = True
        self.conns.discard(conn)
        if conn.transport is not None:
            if conn.busy:
                conn.transport.abort()
            else:
                conn.transport.close()
        elif conn.task is not None:
            conn.task.cancel()

    def closed_one(self) -> None:
        self.transports -= 1
        if not self.transports and self.all_closed is not None and not self.all_closed.done():
            self.all_closed.set_result(None)

    def check_quiet(self) -> None:
        if not (self.sending or self.inflight or self.pending or self.quiet.done()):
            self.quiet.set_result(None)

    async def ticking(self) -> None:
        """Time out requests past their deadline; report progress."""
        limit = self.spec.timeout
        while True:
            await asyncio.sleep(min(0.25, limit / 4))
            now = perf_counter()
            for conn in [c for c in self.conns if c.busy and now - (c.sent or c.due) > limit]:
                self.retire(conn)
                self.finish(conn, "timeout")
                self.next(None)
            expired = []
            while self.pending and now - self.pending[0] > limit:
                expired.append(self.pending.popleft())
            self.expire(expired)
            self.check_quiet()
            if self.progress is not None:
                self.progress(self.done, now - self.start)

    def fire(self) -> None:
        """Open loop: send every request now due (request i is due at start + i / rate),
        then set the timer for the next one, until the duration or the budget runs out."""
        now = perf_counter()
        for _ in range(_BATCH):
            due = self.start + self.issued / cast(float, self.spec.rate)
            if not self.sending or due >= self.stop_at or (
                    due >= self.measure_from and self.budget <= 0):
                self.sending = False
                self.check_quiet()
                return
            if due > now:
                cast(_Timer, self.timer).at(due)
                return
            self.dispatch(None, due, now)
            self.issued += 1
        cast(_Timer, self.timer).at(now)  # behind: carry on once the loop has seen to I/O

    async def drive(self) -> LoadResult:
        ticker = self.loop.create_task(self.ticking())
        try:
            if self.spec.concurrency is not None:
                for _ in range(self.spec.concurrency):
                    self.next(None)
            else:
                self.timer = _Timer(self.loop, self.fire)
                self.fire()
            await asyncio.wait([self.quiet], timeout=self.stop_at - perf_counter())
            self.sending = False
            self.check_quiet()
            await asyncio.wait([self.quiet], timeout=min(self.spec.grace, self.spec.timeout))
        finally:
            ticker.cancel()
            if self.timer is not None:
                self.timer.close()
            await asyncio.wait([ticker])
            await self.teardown()
        if self.progress is not None:
            self.progress(self.done, perf_counter() - self.start)
        if self.last_outcome:
            self.result.elapsed_s = self.last_outcome - self.measure_from
        return self.result

    async def teardown(self) -> None:
        """What is still out timed out; close every connection and wait until each is
        closed, so that no socket outlives the run."""
        self.sending = False
        self.expire(list(self.pending))
        self.pending.clear()
        for conn in list(self.conns):
            self.retire(conn)
            if conn.busy:
                self.finish(conn, "timeout")
        self.idle.clear()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2.0)
        if self.transports:
            self.all_closed = self.loop.create_future()
            await asyncio.wait([self.all_closed], timeout=2.0)


class _Timer:
    """Calls back at an exact ``perf_counter()`` time, through a timerfd on the clock it
    reads (CLOCK_MONOTONIC): asyncio's timers round to whole milliseconds, and waiting
    less than that by polling would spin the CPU shared with the server under test."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self.settime, self.loop, self.callback = libc.timerfd_settime, loop, callback
        self.spec = (ctypes.c_long * 4)()  # struct itimerspec: no interval, then the time
        loop.add_reader(self.fd, self._fired)

    def at(self, when: float) -> None:
        self.spec[2], self.spec[3] = int(when), int(when % 1 * 1e9)
        self.settime(self.fd, 1, self.spec, None)  # 1 = TFD_TIMER_ABSTIME

    def _fired(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:  # disarmed or re-armed since it woke the loop
            return
        self.callback()

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)


async def run(spec: LoadSpec, progress: Progress | None = None) -> LoadResult:
    """Run ``spec`` in this process, on the running event loop (``processes`` and
    ``cpus`` are ignored here: see ``run_processes``)."""
    raise_fd_limit()  # a descriptor per connection
    return await _Run(spec, progress).drive()


def split(spec: LoadSpec) -> list[LoadSpec]:
    """The per-process shares of ``spec``: concurrency, rate, connections and the
    request budget divided as evenly as they go; processes with nothing to do dropped."""
    n = spec.processes if spec.concurrency is None else min(spec.processes, spec.concurrency)

    def share(total: int, i: int) -> int:
        return total // n + (1 if i < total % n else 0)

    return [part for part in (dataclasses.replace(
        spec, processes=1, cpus=None, connections=max(1, share(spec.connections, i)),
        concurrency=None if spec.concurrency is None else share(spec.concurrency, i),
        rate=None if spec.rate is None else spec.rate / n,
        max_requests=None if spec.max_requests is None else share(spec.max_requests, i),
    ) for i in range(n)) if part.max_requests != 0]


def run_processes(spec: LoadSpec, progress: Progress | None = None) -> LoadResult:
    """Run ``spec`` to its end and return what it measured: in child processes when
    ``processes`` > 1 or ``cpus`` is set (each child pinned to its own CPU of the set,
    or to the whole set when there is one child), else on a fresh uvloop in this thread.
    The children start together, on a word from here, once all are ready."""
    if spec.processes == 1 and spec.cpus is None:
        return uvloop.run(run(spec, progress))
    parts = split(spec)
    cpus = parse_cpus(spec.cpus) if spec.cpus else []
    context = multiprocessing.get_context("spawn")  # never fork a process with a loop
    pipes = [context.Pipe() for _ in parts]
    children = [context.Process(target=_child, daemon=True, args=(
        part, cpus if len(parts) == 1 or not cpus else [cpus[i % len(cpus)]], pipes[i][1]))
        for i, part in enumerate(parts)]
    limit = time.monotonic() + spec.warmup + spec.duration + spec.grace + 60.0
    try:
        for child in children:
            child.start()
        for _, theirs in pipes:
            theirs.close()
        return _collect([ours for ours, _ in pipes], limit, progress)
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
            child.join()
        for ours, _ in pipes:
            ours.close()


def _collect(pipes: list[Connection], limit: float, progress: Progress | None) -> LoadResult:
    """The children's messages: ("ready",), ("progress", done, elapsed), ("result", json)."""
    waiting, ready = list(pipes), 0
    reports: dict[Connection, tuple[int, float]] = {}
    results: list[LoadResult] = []
    while waiting:
        if time.monotonic() > limit:
            raise RuntimeError("load generator children did not finish in time")
        for pipe in cast(list[Connection], wait(waiting, timeout=1.0)):
            try:
                kind, *payload = pipe.recv()
            except EOFError:
                raise RuntimeError("a load generator child exited without a result") from None
            if kind == "ready":
                ready += 1
                for each in pipes if ready == len(pipes) else ():
                    each.send("go")
            elif kind == "progress":
                reports[pipe] = (payload[0], payload[1])
                if progress is not None:
                    progress(sum(d for d, _ in reports.values()),
                             max(e for _, e in reports.values()))
            else:
                results.append(LoadResult.from_json(payload[0]))
                waiting.remove(pipe)
    for other in results[1:]:
        results[0].merge(other)
    return results[0]


def _child(spec: LoadSpec, cpus: list[int], pipe: Connection) -> None:
    """One process of a multi-process run."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    pipe.send(("ready",))
    if pipe.recv() == "go":
        result = uvloop.run(run(spec, lambda done, elapsed: pipe.send(
            ("progress", done, elapsed))))
        pipe.send(("result", result.to_json()))
    pipe.close()


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", type=Path, help="POST this file (else GET)")
    parser.add_argument("--header", type=_header, action="append", default=[],
                        metavar="'NAME: VALUE'")
    loop = parser.add_mutually_exclusive_group(required=True)
    loop.add_argument("--concurrency", type=int, help="closed loop: connections")
    loop.add_argument("--rate", type=float, help="open loop: requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds measured")
    parser.add_argument("--stream", action="store_true", help="time SSE: ttft, gaps")
    for flag, kind, default, text in (
        ("--connections", int, 4096, "open loop: most connections"),
        ("--warmup", float, 0.0, "seconds not measured, before the duration"),
        ("--max-requests", int, None, "measured requests, at most"),
        ("--end-marker", str, "data: [DONE]", "a stream without it is truncated; '' = none"),
        ("--processes", int, 1, "split the load over this many processes"),
        ("--cpus", str, None, "pin to these CPUs, e.g. 1 or 2-3"),
        ("--timeout", float, 30.0, "per request, seconds"),
        ("--grace", float, 5.0, "seconds requests still out may finish after the duration"),
        ("--output", str, "-", "result JSON file; '-' = stdout"),
        ("--ca", str, None, "https: trust this CA file"),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"{text} ({default})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    flags = ("concurrency", "rate", "connections", "duration", "warmup", "max_requests",
             "stream", "end_marker", "processes", "cpus", "timeout", "grace", "ca")
    spec = LoadSpec(url=args.url, body=args.body_file.read_bytes() if args.body_file else b"",
                    headers=tuple(args.header), **{flag: getattr(args, flag) for flag in flags})
    if spec.processes == 1 and spec.cpus:  # this process is the load generator: pin it
        os.sched_setaffinity(0, parse_cpus(spec.cpus))
        spec = dataclasses.replace(spec, cpus=None)
    result = run_processes(spec)
    data = orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2)
    if args.output == "-":
        sys.stdout.buffer.write(data + b"\n")
    else:
        Path(args.output).write_bytes(data)
    ms = result.histograms["latency"].summary_ms()
    print(f"{result.mode} loop: {result.ok} ok of {result.sent} in {result.elapsed_s:.2f} s, "
          f"{result.rps:.0f} req/s, latency p50 {ms['p50']} ms p99 {ms['p99']} ms, errors "
          f"{result.errors or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
