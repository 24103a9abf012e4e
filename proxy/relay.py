"""Streaming to the client once the upstream's first chunk is in.

``pump`` relays upstream bytes through a ``Relay`` (pass-through scanner or
translation) to the committed client response. Backpressure is the server's: ``write``
waits while the client's socket buffer is full, so a slow client pauses our reads from
the upstream. Silence from the upstream longer than the read timeout
(``QNP_READ_TIMEOUT``, watched by the connection pool's ``Response.readany``) ends the
stream with an error event in the client's format; so does an upstream connection that
breaks. No total-duration cap. A client that leaves raises ``ClientGone``.

Must not import the handlers, auth or the emitter.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.connections import Response, UpstreamIOError
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from proxy.http_server import StreamReply
from proxy.providers.base import Relay, Wire


class ClientGone(Exception):
    """The client closed its connection while we were writing to it."""


class StreamIdle(UpstreamTimeout):
    code = "stream_idle_timeout"
    message = "The upstream provider stopped sending for too long; the stream was ended."


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a relayed stream ended: ``error`` is None when the upstream finished it."""

    error: ProxyError | None


async def pump(
    out: StreamReply,
    resp: Response,
    first: bytes,
    stream: Relay,
    wire: Wire,
) -> Outcome:
    data = first
    err: ProxyError
    try:
        while data:
            chunk = stream.feed(data)
            if chunk:
                await out.write(chunk)
            data = await resp.readany()  # TimeoutError after the pool's read timeout
        tail = stream.finish()
        if tail:
            await out.write(tail)
        await out.write_eof()
        return Outcome(None)
    except ConnectionResetError:
        raise ClientGone() from None
    except TimeoutError:
        err = StreamIdle()
    except (UpstreamIOError, OSError):
        err = UpstreamUnavailable()
    # Headers are gone: the error travels inside the stream, in the client's format.
    try:
        await out.write(stream.finish() + wire.stream_error(err))
        await out.write_eof()
    except ConnectionResetError:
        raise ClientGone() from None
    return Outcome(err)


async def keepalive(out: StreamReply, wire: Wire) -> None:
    try:
        await out.write(wire.keepalive)
    except ConnectionResetError:
        raise ClientGone() from None
