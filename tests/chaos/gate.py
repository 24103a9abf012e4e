"""A TCP forwarder on 127.0.0.1 that a test can cut or freeze, to fail a server on cue.

``cut()``: every open connection is reset and new ones are refused, which is what a
client sees when the server behind it is stopped. ``freeze()``: connections stay open
but no byte moves, as in a hung server; ``deafen()``: requests still reach the server
but its answers are held, as when an answer is lost on the way back (the server did
the work; the client never hears); ``open()`` restores all three. Runs in the test's
event loop; the services under test are separate processes talking through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from urllib.parse import urlsplit, urlunsplit


class Gate:
    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        assert parts.hostname and parts.port
        self._target = (parts.hostname, parts.port)
        self._parts = parts
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._answering = asyncio.Event()
        self._answering.set()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])

    @property
    def url(self) -> str:
        """The target URL with the gate's port in place of the server's."""
        netloc = self._parts.netloc.rsplit(":", 1)[0] + f":{self.port}"
        netloc = netloc.replace(str(self._parts.hostname), "127.0.0.1", 1)
        return urlunsplit(self._parts._replace(netloc=netloc))

    async def start(self) -> Gate:
        await self.open()
        return self

    async def open(self) -> None:
        self._flowing.set()
        self._answering.set()
        if self._server is None:
            self._server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, reuse_address=True
            )

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._flowing.set()  # frozen pumps wake up, find their sockets gone and end
        self._answering.set()

    def freeze(self) -> None:
        self._flowing.clear()

    def deafen(self) -> None:
        self._answering.clear()

    async def close(self) -> None:
        await self.cut()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer, self._answering),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    also: asyncio.Event | None = None) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                if also is not None:
                    await also.wait()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
