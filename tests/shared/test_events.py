"""The event codec: what the proxy writes is exactly what the ingest reads back."""

import uuid

import orjson
import pytest

from shared.events import Event, EventDecodeError, decode, uuid7, uuid7_str


def _event(**kw: object) -> Event:
    base: dict[str, object] = dict(
        id=str(uuid7()), received_at_us=1_700_000_000_000_000, done_at_us=1_700_000_000_250_000,
        endpoint="/v1/chat/completions", status=200, outcome="ok", node_id="node-a",
    )
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    e = _event(first_byte_at_us=1_700_000_000_100_000, account_id="a", key_id="k",
               requested_model="m", served_model="m-1", provider="p", stream=True,
               prompt_tokens=12, completion_tokens=34, cached_tokens=5, reasoning_tokens=6,
               usage_source="upstream", cost_micros=42, source_ip="203.0.113.9")
    assert decode(e.encode()) == e
    assert e.latency_us == 250_000 and e.ttft_us == 100_000


def test_uuid7_is_version_7_and_time_ordered() -> None:
    ids = [uuid7() for _ in range(200)]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    # Millisecond prefix is monotonic across calls.
    assert [u.int >> 80 for u in ids] == sorted(u.int >> 80 for u in ids)


def test_uuid7_str_is_the_canonical_form_of_a_uuid7() -> None:
    texts = [uuid7_str() for _ in range(200)]
    ids = [uuid.UUID(t) for t in texts]
    assert texts == [str(u) for u in ids]  # what Postgres and the event schema expect
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert [u.int >> 80 for u in ids] == sorted(u.int >> 80 for u in ids)
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize(
    "patch",
    [
        {"v": 99},
        {"outcome": "exploded"},
        {"usage_source": "guessed"},
        {"status": "200"},
        {"stream": 1},
        {"prompt_tokens": True},
        {"id": "not-a-uuid"},
    ],
)
def test_decode_refuses_entries_that_do_not_fit_the_schema(patch: dict[str, object]) -> None:
    doc = orjson.loads(_event().encode())
    doc.update(patch)
    with pytest.raises(EventDecodeError):
        decode(orjson.dumps(doc))


def test_decode_refuses_non_json_and_missing_fields() -> None:
    for raw in (b"\xff", b"[1]", b'{"v": 1}'):
        with pytest.raises(EventDecodeError):
            decode(raw)
