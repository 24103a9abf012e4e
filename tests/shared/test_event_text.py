"""Client-chosen strings in events are bounded and cleaned, on encode and on decode.

An event written by an older proxy, with a NUL (which Postgres ``text`` refuses) or an
eight-million-character model name, decodes into something ingest can store, so no
request's event is dead-lettered for what its client sent.
"""

from __future__ import annotations

import orjson
import pytest

from shared.events import TEXT_MAX, Event, clean_text, decode, uuid7_str


@pytest.mark.parametrize(("raw", "clean"), [
    ("demo-mini", "demo-mini"),
    ("gpt-4o ünïcode 模型", "gpt-4o ünïcode 模型"),
    ("a\x00b\tc\r\nd\x7fe\x9bf", "abcdef"),
    ("x" * 8_000_000, "x" * TEXT_MAX),
    ("\x00" * 10_000 + "tail", ""),  # the work is bounded: only a prefix is looked at
])
def test_clean_text_strips_controls_and_truncates(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean


def test_decode_cleans_what_an_old_proxy_sent() -> None:
    event = Event(id=uuid7_str(), received_at_us=1, done_at_us=2, endpoint="/v1/chat\x00",
                  status=404, outcome="not_found", node_id="n\x01",
                  requested_model="evil\x00" + "m" * 8_000_000, source_ip="10.0.0.1")
    decoded = decode(orjson.dumps(event))
    assert decoded.requested_model == "evil" + "m" * (TEXT_MAX - 4)
    assert (decoded.endpoint, decoded.node_id) == ("/v1/chat", "n")
    assert decoded.id == event.id and decoded.source_ip == "10.0.0.1"
