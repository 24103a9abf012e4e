"""The SSE scanner passes bytes through untouched and reads usage on the way."""

import random

import pytest

from proxy.openai_wire import StreamScanner, Usage

CHUNKS = [
    b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant"}}],"usage":null}\n\n',
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n',
    b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n',
]
USAGE = (
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3,'
    b'"total_tokens":14,"prompt_tokens_details":{"cached_tokens":4},'
    b'"completion_tokens_details":{"reasoning_tokens":2}}}\n\n'
)
DONE = b"data: [DONE]\n\n"
STREAM = b"".join(CHUNKS) + USAGE + DONE
EXPECTED = Usage(prompt_tokens=11, completion_tokens=3, cached_tokens=4, reasoning_tokens=2)


def _feed_in_pieces(scanner: StreamScanner, data: bytes, size: int) -> bytes:
    out = b"".join(scanner.feed(data[i:i + size]) for i in range(0, len(data), size))
    return out + scanner.finish()


@pytest.mark.parametrize("size", [1, 7, 64, len(STREAM)])
def test_client_that_asked_for_usage_gets_every_byte(size: int) -> None:
    scanner = StreamScanner(forward_usage=True)
    assert _feed_in_pieces(scanner, STREAM, size) == STREAM
    assert scanner.usage == EXPECTED


@pytest.mark.parametrize("size", [1, 7, 64, len(STREAM)])
def test_usage_chunk_is_cut_when_the_client_did_not_ask(size: int) -> None:
    scanner = StreamScanner(forward_usage=False)
    assert _feed_in_pieces(scanner, STREAM, size) == b"".join(CHUNKS) + DONE
    assert scanner.usage == EXPECTED


def test_usage_riding_on_a_content_chunk_is_kept_and_read() -> None:
    chunk = (b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],'
             b'"usage":{"prompt_tokens":1,"completion_tokens":1}}\r\n\r\n')
    scanner = StreamScanner(forward_usage=False)
    assert scanner.feed(chunk) == chunk
    assert scanner.usage == Usage(1, 1)


def test_stream_without_usage_leaves_usage_unknown() -> None:
    scanner = StreamScanner(forward_usage=False)
    assert scanner.feed(b"".join(CHUNKS) + DONE) == b"".join(CHUNKS) + DONE
    assert scanner.usage is None and scanner.events == 4


class _ExactScanner(StreamScanner):
    """The scanner with its fast path turned off: the reference it must agree with."""

    __slots__ = ()

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        return self._feed_exact(buf, data)


@pytest.mark.parametrize("framing", [b"\n\n", b"\r\n\r\n", b"\n\n\n"])
@pytest.mark.parametrize("forward_usage", [True, False])
def test_fast_path_agrees_with_the_exact_scan_on_any_split(
        framing: bytes, forward_usage: bool) -> None:
    # Content that mentions "usage" (escaped, as JSON carries it) must not fool either.
    stream = STREAM.replace(b"\n\n", framing).replace(
        b'"Hi"', b'"say \\"usage\\": {1}"')
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 12)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        fast, exact = (StreamScanner(forward_usage=forward_usage),
                       _ExactScanner(forward_usage=forward_usage))
        out_fast = b"".join(fast.feed(p) for p in pieces) + fast.finish()
        out_exact = b"".join(exact.feed(p) for p in pieces) + exact.finish()
        assert out_fast == out_exact
        assert (fast.usage, fast.events) == (exact.usage, exact.events)
    assert fast.usage is not None
