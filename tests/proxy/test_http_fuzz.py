"""Generated and mangled requests against a real HttpServer (Hypothesis, bounded time).

Each case is one connection: one to three pipelined requests (Content-Length, chunked
or no body; HTTP/1.0 or 1.1; odd, empty and oversized headers; bodies that hold a whole
request of their own), optionally mangled (cut short, garbage inserted, a byte changed),
sent in random pieces, then the client half-closes; the head check refuses some
requests and makes others wait. What must hold after every case:
no 5xx but 505 (a version we do not speak), nothing logged at ERROR (a parser callback
or the server itself failing), a request inside a body never reaching the handler when
the framing was intact, and nothing left behind once the client has gone (connections,
buffered body bytes, per-IP counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import string
from collections.abc import Awaitable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.http_server import HttpLimits, HttpServer, Reply, Request, StreamReply

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")

_value_chars = st.text(alphabet=string.printable.replace("\r", "").replace("\n", ""),
                       max_size=40)
_header = st.one_of(
    st.tuples(st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=12),
              _value_chars),
    st.just(("X-Huge", "h" * 70_000)),
    st.just(("Host", "second-host")),
    st.just(("Content-Length", "3")),
    st.just(("Transfer-Encoding", "chunked")),
    st.just(("Expect", "100-continue")),
    st.just(("Upgrade", "h2c")),
    st.just(("Connection", "close")),
)
_request = st.fixed_dictionaries({
    "method": st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS"]),
    "version": st.sampled_from(["1.1", "1.1", "1.0"]),
    "headers": st.lists(_header, max_size=4),
    "framing": st.sampled_from(["length", "chunked", "none"]),
    "body": st.one_of(st.binary(max_size=200), st.just(SMUGGLED),
                      st.just(b"0\r\n\r\n" + SMUGGLED)),
    "pieces": st.integers(1, 4),
})
_mangle = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["cut", "insert", "flip"]), st.floats(0, 1),
              st.binary(min_size=1, max_size=8)),
)


def _build(i: int, r: dict[str, object]) -> bytes:
    headers = [(str(n), str(v)) for n, v in r["headers"]]  # type: ignore[attr-defined]
    body = r["body"] if r["framing"] != "none" else b""
    assert isinstance(body, bytes)
    lines = [f"{r['method']} /r{i} HTTP/{r['version']}", "Host: fuzz"]
    lines += [f"{n}: {v}" for n, v in headers]
    if r["framing"] == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif r["framing"] == "chunked":
        lines.append("Transfer-Encoding: chunked")
        step = max(1, len(body) // int(r["pieces"]))  # type: ignore[call-overload]
        payload = b"".join(b"%x\r\n%b\r\n" % (len(body[j:j + step]), body[j:j + step])
                           for j in range(0, len(body), step)) + b"0\r\n\r\n"
    else:
        payload = b""
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + payload


def _mangled(data: bytes, mangle: tuple[str, float, bytes] | None) -> bytes:
    if mangle is None:
        return data
    how, where, what = mangle
    at = int(where * len(data))
    if how == "cut":
        return data[:at]
    if how == "insert":
        return data[:at] + what + data[at:]
    return data[:at] + what[:1] + data[at + 1:]


class _Scripted:
    """The handler and the head check: /r1 is refused its body, /r2 waits for its
    verdict (yes), the rest pass at once."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def check(self, request: Request) -> bool | Awaitable[bool]:
        if request.path == "/r2":
            return asyncio.sleep(0, True)
        return request.path != "/r1"

    async def __call__(self, request: Request) -> Reply | StreamReply:
        self.paths.append(request.path)
        if request.body_refused:
            return Reply(401, b"refused")
        if request.path.endswith("3"):  # some answers stream, the rest are one buffer
            out = StreamReply(200)
            await out.prepare(request)
            await out.write(request.body or b"-")
            await out.write_eof()
            return out
        return Reply(200, b"%d" % len(request.body))


async def _case(server: HttpServer, port: int, data: bytes, splits: list[int]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            at = 0
            for size in [*splits, len(data)]:
                if at >= len(data):
                    break
                writer.write(data[at:at + size])
                at += size
                await writer.drain()
            writer.write_eof()
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionError):
                return await reader.read(-1)
            return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        async with asyncio.timeout(10):  # nothing outlives its client
            while server.connections:
                await asyncio.sleep(0.005)


def test_generated_and_mangled_requests_never_break_the_server(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    script = _Scripted()
    server = HttpServer(script, max_body=4096, keepalive_timeout=1.0, head_check=script.check,
                        limits=HttpLimits(head_timeout=1.0, body_rate_window=1.0,
                                          max_connections_per_ip=8, max_pipelined=2))
    port = loop.run_until_complete(server.start("127.0.0.1", 0))
    caplog.set_level(logging.ERROR, logger="qnp.proxy.http")

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests=st.lists(_request, min_size=1, max_size=3), mangle=_mangle,
           splits=st.lists(st.integers(1, 600), max_size=5))
    def case(requests: list[dict[str, object]], mangle: tuple[str, float, bytes] | None,
             splits: list[int]) -> None:
        script.paths.clear()
        data = _mangled(b"".join(_build(i, r) for i, r in enumerate(requests)), mangle)
        raw = loop.run_until_complete(_case(server, port, data, splits))
        statuses = [int(s) for s in _STATUS.findall(raw)]
        assert all(s < 500 or s == 505 for s in statuses), statuses
        assert caplog.records == []
        assert len(script.paths) <= len(requests) + (mangle is not None)
        if mangle is None:  # intact framing: only the requests we framed, in order
            assert script.paths == [f"/r{i}" for i in range(len(script.paths))]
        assert server.buffered_body == 0 and server.ips.held == {}

    try:
        case()
    finally:
        loop.run_until_complete(server.shutdown(1.0))
        loop.close()
