"""Incremental Server-Sent Events framing, shared by every wire.

``SSEBuffer.feed`` takes bytes as they arrive and returns the whole events they
complete, each with its raw bytes (for byte-exact pass-through), its ``event:`` name
and its joined ``data:`` payload. A partial event waits for the rest. No I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    raw: bytes
    name: bytes
    data: bytes

    def json(self) -> object:
        """The data payload as JSON, or None when it is not JSON (``[DONE]``, comments)."""
        if not self.data:
            return None
        try:
            return orjson.loads(self.data)
        except orjson.JSONDecodeError:
            return None


class SSEBuffer:
    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[SSEEvent]:
        buf = self._pending + data if self._pending else data
        events: list[SSEEvent] = []
        start = 0
        for m in _EVENT_END.finditer(buf):
            events.append(parse_event(buf[start:m.end()]))
            start = m.end()
        self._pending = buf[start:]
        return events

    def rest(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


def parse_event(raw: bytes) -> SSEEvent:
    name = b""
    data: list[bytes] = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return SSEEvent(raw, name, b"\n".join(data))


def sse(data: object, event: str | None = None) -> bytes:
    """One SSE event with a JSON payload."""
    head = b"event: " + event.encode() + b"\n" if event is not None else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"
