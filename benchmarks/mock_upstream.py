"""A fast mock LLM provider for the benchmarks: OpenAI, Anthropic and Gemini on one port.

Owns: the HTTP/1.1 server (a raw ``asyncio.Protocol`` on uvloop with httptools'
request parser, keep-alive and pipelining; ``benchmarks.mock_wire`` says which cached
bytes answer a request), pacing streams with loop timers (one ``call_at`` per write,
never a sleeping task per request), flow control towards slow readers, and the process
plumbing the benchmark servers share: pinning to CPUs, raising the open-file limit and
running several workers on one port with ``SO_REUSEPORT`` (``supervise``).

It must stay much faster than what it feeds, because it shares a core with the load
generator: per request it parses the JSON body, makes one dictionary lookup and one
``transport.write`` (or one per paced chunk); it never serialises JSON.

Must not import ``proxy``, ``control_plane`` or ``devstack``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections import deque
from collections.abc import Sequence
from typing import cast

import httptools
import uvloop

from benchmarks.mock_wire import MockConfig, Replies, Request, Scenario
from benchmarks.processes import prepare_process, reuseport_socket, supervise, watch_parent

_READY = "mock_upstream ready on http://{host}:{port}"
_QUEUE_MAX = 16  # pipelined requests held before we stop reading from the client
_AUTH_HEADERS = frozenset({b"authorization", b"x-api-key", b"x-goog-api-key"})


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer them in order, pace streams."""

    def __init__(self, replies: Replies, connections: set[_Connection],
                 check_auth: bool) -> None:
        self._replies = replies
        self._connections = connections
        self._check_auth = check_auth
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._credentials: list[bytes] = []
        self._body: list[bytes] = []
        self._expects_continue = False
        self._queue: deque[Request] = deque()
        self._reading_paused = False
        self._writing_paused = False
        # The response being sent, when it needs timers: what is left to write of it.
        self._writes: tuple[bytes, ...] = ()
        self._next_write = 0
        self._delay = 0.0
        self._due = 0.0
        self._keep_alive = True
        self._timer: asyncio.TimerHandle | None = None
        self._stalled = False  # a timer fired while writing was paused

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not registered as an asyncio.Transport subclass.
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.close()
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                                      b"connection: close\r\n\r\n")
            self.close()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._set_reading(False)

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._set_reading(len(self._queue) < _QUEUE_MAX)
        if self._stalled:
            self._stalled = False
            self._due = self._loop.time()
            self._tick()
        elif not self._writes:
            self._answer_queued()

    def close(self) -> None:
        """Close once what was written has gone out; nothing more is written from now."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self._url = b""
        self._credentials = []
        self._body = []
        self._expects_continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _AUTH_HEADERS:
            if self._check_auth:
                self._credentials.append(value)
        elif name == b"expect" and value.lower() == b"100-continue":
            self._expects_continue = True

    def on_headers_complete(self) -> None:
        # curl sends large bodies only after this (or after waiting a second for it).
        if self._expects_continue and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._queue.append(Request(self._parser.get_method(), self._url, self._credentials,
                                    b"".join(self._body), self._parser.should_keep_alive()))
        if len(self._queue) >= _QUEUE_MAX:
            self._set_reading(False)
        if not self._writes:
            self._answer_queued()

    # --- answering ---

    def _answer_queued(self) -> None:
        """Answer queued requests in order until one needs timers or the client is slow."""
        while self._queue and not self._writing_paused and self._transport is not None:
            request = self._queue.popleft()
            reply = self._replies.reply(request)
            if reply.immediate:
                self._transport.write(reply.writes[0])
                if not request.keep_alive:
                    self.close()
                continue
            self._writes, self._next_write = reply.writes, 0
            self._delay, self._keep_alive = reply.delay, request.keep_alive
            self._due = self._loop.time() + reply.first_wait
            self._timer = self._loop.call_at(self._due, self._tick)
            break
        if not self._writing_paused:
            self._set_reading(len(self._queue) < _QUEUE_MAX)

    def _tick(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        if self._writing_paused:  # the client reads slowly: wait for resume_writing
            self._stalled = True
            return
        self._transport.write(self._writes[self._next_write])
        self._next_write += 1
        if self._next_write < len(self._writes):
            # Due times advance from the schedule, not from now, so a busy loop does
            # not stretch a stream's total duration.
            self._due += self._delay
            self._timer = self._loop.call_at(self._due, self._tick)
            return
        self._writes = ()
        if not self._keep_alive:
            self.close()
            return
        self._answer_queued()

    def _set_reading(self, on: bool) -> None:
        if self._transport is None or on != self._reading_paused:
            return
        if on:
            self._transport.resume_reading()
        else:
            self._transport.pause_reading()
        self._reading_paused = not on


# --- python -m benchmarks.mock_upstream ------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if args.parent_pid is not None:
        watch_parent(loop, args.parent_pid, stop.set)
    config = MockConfig(
        defaults=Scenario(ttft=args.ttft_ms / 1000, chunks=args.chunks,
                          delay=args.chunk_delay_ms / 1000,
                          tokens_per_chunk=args.tokens_per_chunk),
        api_key=args.api_key.encode() if args.api_key else None)
    replies = Replies(config)
    connections: set[_Connection] = set()
    sock = reuseport_socket(args.host, args.port)
    server = await loop.create_server(
        lambda: _Connection(replies, connections, config.api_key is not None),
        sock=sock, backlog=4096)
    port = sock.getsockname()[1]
    print(_READY.format(host=args.host, port=port), flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for connection in list(connections):
            connection.close()
        await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mock_upstream",
                                     description="A fast mock LLM provider for benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="workers sharing the port")
    parser.add_argument("--api-key", help="require this key (Bearer, x-api-key, "
                                          "x-goog-api-key or ?key=)")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--cpus", help="pin to these CPUs, e.g. 1 or 0-3 (children too)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    prepare_process(args.cpus)
    if args.processes > 1:
        return supervise("benchmarks.mock_upstream", [*raw, "--processes", "1"],
                         args.processes, args.host, args.port, _READY)
    uvloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
