"""The load generator against small servers started here, on 127.0.0.1.

What a benchmark reader relies on: every request sent is accounted for (ok or an error
of a named kind), streams are timed (ttft, gaps, total) and checked for their end, a
server that hangs cannot hang the run, open loop charges a stall to every request that
queued behind it (no coordinated omission), processes merge, and the CLI writes the
agreed JSON. No wall-clock thresholds beyond the delays planted in the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from benchmarks.loadgen import LoadResult, LoadSpec, run, run_processes
from tests.support import ROOT, free_port

BODY = b'{"model": "m", "messages": []}'
STREAM_CHUNKS = 4
CHUNK_DELAY = 0.02
STALL = 0.3


@dataclasses.dataclass
class Seen:
    """What the test server saw."""

    requests: int = 0
    refused: int = 0  # answered 429
    peers: set[object] = dataclasses.field(default_factory=set)  # (host, port) of clients
    stall_at: int = -1  # the request with this number waits STALL seconds


SEEN = web.AppKey("seen", Seen)


def _count(request: web.Request) -> Seen:
    seen = request.app[SEEN]
    seen.requests += 1
    seen.peers.add(request.transport and request.transport.get_extra_info("peername"))
    return seen


async def _json(request: web.Request) -> web.Response:
    seen = _count(request)
    await request.read()
    if seen.requests == seen.stall_at:
        await asyncio.sleep(STALL)
    return web.json_response({"ok": True})


async def _limited(request: web.Request) -> web.Response:
    seen = _count(request)
    if seen.requests % 3 == 0:
        seen.refused += 1
        return web.json_response({"error": "slow down"}, status=429)
    return web.json_response({"ok": True})


async def _close(request: web.Request) -> web.Response:
    _count(request)
    response = web.json_response({"ok": True})
    response.force_close()  # answers with Connection: close, then closes
    return response


async def _sse(request: web.Request, done: bool) -> web.StreamResponse:
    _count(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(STREAM_CHUNKS):
        await response.write(b'data: {"n": %d}\n\n' % i)
        await asyncio.sleep(CHUNK_DELAY)
    if done:
        await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _stream(request: web.Request) -> web.StreamResponse:
    return await _sse(request, done=True)


async def _cut(request: web.Request) -> web.StreamResponse:
    return await _sse(request, done=False)


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[tuple[str, Seen]]:
    app = web.Application()
    app[SEEN] = Seen()
    app.router.add_post("/json", _json)
    app.router.add_post("/limited", _limited)
    app.router.add_post("/close", _close)
    app.router.add_post("/stream", _stream)
    app.router.add_post("/cut", _cut)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", app[SEEN]
    await runner.cleanup()


@pytest.fixture
async def seen(server: tuple[str, Seen]) -> Seen:
    fresh = server[1]
    fresh.__init__()  # type: ignore[misc]  # each test counts from zero
    return fresh


def _spec(url: str, **overrides: object) -> LoadSpec:
    fields: dict[str, object] = {"body": BODY, "duration": 30.0, "timeout": 10.0}
    return LoadSpec(url=url, **(fields | overrides))  # type: ignore[arg-type]


def _accounted(result: LoadResult) -> None:
    assert result.sent == result.ok + sum(result.errors.values())


async def test_closed_loop_counts_every_request(server: tuple[str, Seen], seen: Seen) -> None:
    url = server[0]
    done: list[int] = []
    result = await run(_spec(f"{url}/json", concurrency=4, max_requests=200),
                       progress=lambda n, _elapsed: done.append(n))
    assert (result.sent, result.ok, result.errors) == (200, 200, {})
    assert seen.requests == 200
    assert len(seen.peers) == 4  # keep-alive: one connection per worker
    assert result.histograms["latency"].count == result.histograms["service"].count == 200
    assert result.histograms["ttft"].count == result.histograms["gap"].count == 0
    assert done[-1] == 200 and done == sorted(done)
    assert result.rps > 0 and result.elapsed_s > 0


async def test_warmup_requests_are_not_recorded(server: tuple[str, Seen], seen: Seen) -> None:
    result = await run(_spec(f"{server[0]}/json", concurrency=2, warmup=0.3,
                             max_requests=50))
    assert result.ok == 50
    assert seen.requests > 50  # the warmup's requests were sent, not counted


async def test_streams_are_timed(server: tuple[str, Seen], seen: Seen) -> None:
    result = await run(_spec(f"{server[0]}/stream", concurrency=3, max_requests=12,
                             stream=True))
    assert (result.ok, result.errors) == (12, {})
    ttft, total, gap = (result.histograms[k] for k in ("ttft", "total", "gap"))
    assert ttft.count == total.count == 12
    assert ttft.max() < total.min()  # the chunks came CHUNK_DELAY apart after the first
    assert gap.count >= 12  # at least one gap per stream between its delayed chunks
    assert gap.percentile(50) >= CHUNK_DELAY / 2


async def test_a_stream_without_its_end_is_truncated(server: tuple[str, Seen],
                                                     seen: Seen) -> None:
    result = await run(_spec(f"{server[0]}/cut", concurrency=2, max_requests=6, stream=True))
    assert (result.ok, result.errors) == (0, {"truncated": 6})
    assert result.histograms["ttft"].count == 0


async def test_errors_are_counted_by_status(server: tuple[str, Seen], seen: Seen) -> None:
    result = await run(_spec(f"{server[0]}/limited", concurrency=3, max_requests=90))
    assert result.errors == {"HTTP 429": seen.refused}
    assert seen.refused == 30
    assert result.ok == 60 == result.histograms["latency"].count
    _accounted(result)


async def test_connection_close_opens_a_new_connection(server: tuple[str, Seen],
                                                       seen: Seen) -> None:
    result = await run(_spec(f"{server[0]}/close", concurrency=2, max_requests=20))
    assert (result.ok, result.errors) == (20, {})
    assert len(seen.peers) == seen.requests == 20


async def test_a_refused_connection_is_a_connect_error() -> None:
    result = await run(_spec(f"http://127.0.0.1:{free_port()}/json", concurrency=2,
                             duration=0.3))
    assert result.ok == 0
    assert set(result.errors) == {"connect"}
    _accounted(result)


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[str]:
    """Accepts connections, reads requests, never answers."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/json"
    finally:
        silent.close()
        await silent.wait_closed()


async def test_requests_to_a_silent_server_time_out_and_the_run_ends() -> None:
    async with _silent_server() as url:
        result = await run(_spec(url, concurrency=3, duration=0.5, timeout=0.2, grace=1.0))
    assert result.ok == 0
    assert set(result.errors) == {"timeout"}
    assert result.errors["timeout"] >= 6  # each worker timed out, reconnected, again
    _accounted(result)


async def test_outstanding_requests_count_as_timeouts_after_the_grace() -> None:
    async with _silent_server() as url:
        closed = await run(_spec(url, concurrency=3, duration=0.2, timeout=60.0, grace=0.2))
        opened = await run(_spec(url, rate=50.0, duration=0.2, timeout=60.0, grace=0.2))
    assert (closed.sent, closed.errors) == (3, {"timeout": 3})
    assert opened.sent == opened.errors["timeout"] == 10


async def test_open_loop_charges_a_stall_to_the_requests_behind_it(
        server: tuple[str, Seen], seen: Seen) -> None:
    """One connection, 200 requests/s, and request 20 stalls the server for 0.3 s: the
    ~60 requests due during the stall wait for it. `latency` (from the due time) must
    show them; `service` (from the send) must not."""
    seen.stall_at = 20
    result = await run(_spec(f"{server[0]}/json", rate=200.0, connections=1, duration=0.6))
    assert (result.sent, result.ok, result.errors) == (120, 120, {})
    assert len(seen.peers) == 1
    latency, service = result.histograms["latency"], result.histograms["service"]
    assert latency.count_at_least(STALL / 2) >= 15
    assert service.count_at_least(STALL * 0.9) == 1  # the stalled request itself
    assert service.count_at_least(STALL / 2) <= 3


async def test_open_loop_sends_at_the_rate(server: tuple[str, Seen], seen: Seen) -> None:
    result = await run(_spec(f"{server[0]}/json", rate=300.0, duration=0.3))
    assert (result.mode, result.rate, result.concurrency) == ("open", 300.0, None)
    assert result.sent == result.ok == seen.requests == 90


async def test_processes_split_the_work_and_merge(server: tuple[str, Seen],
                                                  seen: Seen) -> None:
    reports: list[tuple[int, float]] = []
    spec = _spec(f"{server[0]}/json", concurrency=4, max_requests=100, processes=2)
    result = await asyncio.to_thread(run_processes, spec, lambda n, t: reports.append((n, t)))
    # Each child may send only its half of the budget: 100 ok means both did theirs.
    assert (result.processes, result.concurrency) == (2, 4)
    assert (result.sent, result.ok, result.errors) == (100, 100, {})
    assert seen.requests == 100 and len(seen.peers) == 4
    assert result.histograms["latency"].count == 100
    assert reports and reports[-1][0] == 100


async def test_cli_writes_the_agreed_json(server: tuple[str, Seen], seen: Seen,
                                          tmp_path: Path) -> None:
    body, output = tmp_path / "body.json", tmp_path / "out.json"
    body.write_bytes(BODY)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.loadgen", "--url", f"{server[0]}/json",
        "--body-file", str(body), "--header", "Authorization: Bearer k",
        "--concurrency", "2", "--duration", "5", "--max-requests", "30",
        "--output", str(output), cwd=ROOT, env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    log, _ = await child.communicate()
    assert child.returncode == 0, log.decode()
    data = orjson.loads(output.read_bytes())
    assert set(data) == {"mode", "concurrency", "rate", "processes", "duration_s",
                         "elapsed_s", "sent", "ok", "rps", "errors", "histograms",
                         "summary"}
    assert (data["mode"], data["concurrency"], data["rate"]) == ("closed", 2, None)
    assert (data["processes"], data["sent"], data["ok"], data["errors"]) == (1, 30, 30, {})
    assert set(data["histograms"]) == set(data["summary"]) == {
        "latency", "service", "ttft", "gap", "total"}
    assert set(data["summary"]["latency"]) == {"p50", "p90", "p99", "p999", "mean", "max",
                                               "count"}
    assert data["summary"]["latency"]["count"] == 30
    assert data["rps"] > 0
    assert LoadResult.from_json(data).to_json() == data
