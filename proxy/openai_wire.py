"""The OpenAI stream pass-through: what ``providers/openai.py`` uses when the client and
the upstream both speak OpenAI's format, so bytes are not re-serialised.

- ``usage_from``: token counts from a ``usage`` object.
- ``StreamScanner``: an incremental SSE scanner that passes bytes through untouched,
  reads usage as it flies by, and cuts the extra usage-only chunk when the client did
  not ask for it.

Pure functions and small classes; no I/O. Must not import the handlers.
"""

from __future__ import annotations

import re

import orjson

from proxy.providers.base import Usage

__all__ = ["StreamScanner", "Usage", "usage_from"]

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        cached_tokens=_int(prompt_details.get("cached_tokens"))
        if isinstance(prompt_details, dict) else 0,
        reasoning_tokens=_int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict) else 0,
    )


class StreamScanner:
    """Feed upstream SSE bytes in, get client bytes out; usage is read on the way.

    With ``forward_usage`` the output is exactly the input, chunk for chunk. Without it,
    only whole events are released (a partial event waits for its end, which in practice
    arrives in the same read), and a usage-only chunk (``choices`` empty) is cut.
    """

    __slots__ = ("_forward_usage", "_pending", "events", "usage")

    def __init__(self, *, forward_usage: bool) -> None:
        self._forward_usage = forward_usage
        self._pending = b""
        self.events = 0
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        if b"\r" in buf or b"\n\n\n" in buf:  # unusual framing: event by event
            return self._feed_exact(buf, data)
        # The common case, in C: LF-framed events passed through and counted up to the
        # event that carries a usage object (it comes once, near the end; "usage":null
        # does not count); only from that event on is the read scanned event by event.
        end = buf.rfind(b"\n\n") + 2 if b"\n\n" in buf else 0
        usage = _USAGE_OBJECT.search(buf, 0, end)
        head = end
        if usage is not None:
            before = buf.rfind(b"\n\n", 0, usage.start())
            head = before + 2 if before >= 0 else 0
        self.events += buf.count(b"\n\n", 0, head)
        if usage is None:
            self._pending = buf[end:]
            return data if self._forward_usage else buf[:end]
        tail = self._feed_exact(buf[head:], b"")
        return data if self._forward_usage else buf[:head] + tail

    def _feed_exact(self, buf: bytes, data: bytes) -> bytes:
        start = 0
        cut: list[tuple[int, int]] = []
        for m in _EVENT_END.finditer(buf):
            end = m.end()
            self.events += 1
            if _USAGE_OBJECT.search(buf, start, end) and self._read_usage(buf[start:end]):
                cut.append((start, end))
            start = end
        self._pending = buf[start:]
        if self._forward_usage:
            return data
        if not cut:
            return buf[:start]
        out, at = [], 0
        for a, b in cut:
            out.append(buf[at:a])
            at = b
        out.append(buf[at:start])
        return b"".join(out)

    def finish(self) -> bytes:
        """Whatever partial event is left when the upstream closes (forwarded as is)."""
        rest, self._pending = self._pending, b""
        return b"" if self._forward_usage else rest

    def _read_usage(self, event: bytes) -> bool:
        """Record the usage in one event; True if it is a usage-only chunk."""
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            try:
                doc = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return False
            if not isinstance(doc, dict):
                return False
            usage = usage_from(doc.get("usage"))
            if usage is None:
                return False
            self.usage = usage
            return not doc.get("choices")
        return False
