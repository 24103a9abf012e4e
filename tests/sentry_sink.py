"""A Sentry ingestion endpoint of our own: a real aiohttp server on 127.0.0.1 that
accepts what the official SDKs send to ``/api/<project>/envelope/`` (gzip or plain,
with the browser SDK's CORS), parses each envelope into its items, and records it with
the request's URL and headers, so tests can prove both that events arrive and that
nothing they must not carry is anywhere in what arrived.

``python -m tests.sentry_sink [--port N]`` runs it alone and prints each event's
summary (for trying Sentry with ``make run``).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

PUBLIC_KEY = "qnptestpublickey"
_CORS = {"Access-Control-Allow-Origin": "*",
         "Access-Control-Allow-Headers": "content-type, x-sentry-auth",
         "Access-Control-Allow-Methods": "POST, OPTIONS"}


class EnvelopeError(ValueError):
    """The body is not a Sentry envelope."""


@dataclass(frozen=True)
class Item:
    headers: dict[str, Any]
    payload: bytes

    @property
    def type(self) -> str:
        return str(self.headers.get("type", ""))

    def json(self) -> Any:
        return orjson.loads(self.payload)


@dataclass(frozen=True)
class Envelope:
    project: str
    url: str  # as requested, query string included
    request_headers: dict[str, str]
    headers: dict[str, Any]
    items: list[Item]
    raw: bytes  # the body, decompressed

    def everything(self) -> str:
        """Every byte that reached us for this envelope, as text to search."""
        return "\n".join([self.url, repr(self.request_headers),
                          self.raw.decode("utf-8", errors="replace")])


def parse(body: bytes) -> tuple[dict[str, Any], list[Item]]:
    """Sentry's envelope format: a JSON header line, then items, each a JSON header line
    and a payload (``length`` bytes, else up to the next newline)."""
    head, sep, rest = body.partition(b"\n")
    try:
        headers = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise EnvelopeError(f"envelope header: {e}") from None
    items: list[Item] = []
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        try:
            item_headers = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise EnvelopeError(f"item header: {e}") from None
        length = item_headers.get("length")
        if isinstance(length, int):
            payload, rest = rest[:length], rest[length:]
            rest = rest.removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append(Item(item_headers, payload))
    return headers, items


def _decompress(body: bytes, encoding: str) -> bytes:
    # aiohttp's server already undoes a Content-Encoding it knows (gzip, deflate); a body
    # still compressed is one it did not.
    if body[:2] == b"\x1f\x8b":
        return gzip.decompress(body)
    if encoding in ("", "identity", "gzip", "deflate"):
        return body
    raise EnvelopeError(f"unsupported Content-Encoding {encoding!r}")


@dataclass
class SentrySink:
    """Start with ``async with SentrySink() as sink``; ``sink.dsn`` is what SDKs take."""

    host: str = "127.0.0.1"
    port: int = 0
    envelopes: list[Envelope] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    on_envelope: Callable[[Envelope], None] | None = None
    _runner: web.AppRunner | None = None
    _changed: asyncio.Condition | None = None

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def dsn(self, project: int = 1) -> str:
        return f"http://{PUBLIC_KEY}@{self.host}:{self.port}/{project}"

    def events(self) -> list[dict[str, Any]]:
        """Every error event received (item type ``event``), parsed."""
        return [i.json() for e in self.envelopes for i in e.items if i.type == "event"]

    async def wait_for(self, done: Callable[[SentrySink], bool], timeout: float = 30.0
                       ) -> None:
        """Until ``done(self)`` holds (a hang guard, not a measurement)."""
        assert self._changed is not None
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: done(self)), timeout)

    async def _envelope(self, request: web.Request) -> web.Response:
        if request.method == "OPTIONS":
            return web.Response(status=204, headers=_CORS)
        try:
            raw = _decompress(await request.read(),
                              request.headers.get("Content-Encoding", "").lower())
            headers, items = parse(raw)
        except (EnvelopeError, OSError, zlib.error) as e:
            self.rejected.append(str(e))
            return web.json_response({"detail": str(e)}, status=400, headers=_CORS)
        envelope = Envelope(request.match_info["project"], str(request.rel_url),
                            dict(request.headers), headers, items, raw)
        assert self._changed is not None
        async with self._changed:
            self.envelopes.append(envelope)
            self._changed.notify_all()
        if self.on_envelope is not None:
            self.on_envelope(envelope)
        return web.json_response({"id": headers.get("event_id")}, headers=_CORS)

    async def __aenter__(self) -> SentrySink:
        self._changed = asyncio.Condition()
        app = web.Application()
        app.router.add_route("*", "/api/{project}/envelope/", self._envelope)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _print(envelope: Envelope) -> None:
    for item in envelope.items:
        if item.type == "event":
            event = item.json()
            kinds = [v.get("type") for v in event.get("exception", {}).get("values", [])]
            print(f"sentry event: {event.get('level')} {event.get('logger')} "
                  f"{event.get('logentry', {}).get('message', '')!r} {kinds}", flush=True)


async def _main(port: int) -> None:
    async with SentrySink(port=port, on_envelope=_print) as sink:
        print(f"Sentry sink: SENTRY_DSN={sink.dsn()}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(_main(parser.parse_args().port))
