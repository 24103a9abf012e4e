"""The event stream's shard names: one shard keeps today's names, more get hash tags."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from shared.redis_names import EventShard, RedisNames


def test_one_shard_is_the_unsharded_stream_unchanged() -> None:
    names = RedisNames("qnp")
    assert names.event_shards(1) == (EventShard("qnp:events", "qnp:events:dead"),)
    assert names.event_streams(1) == ("qnp:events",)


def test_each_shard_has_its_own_slot_shared_with_its_dead_letters() -> None:
    shards = RedisNames("qnp").event_shards(8)
    assert shards[0] == EventShard("qnp:{ev0}:events", "qnp:{ev0}:events:dead")
    assert len({key_slot(s.stream.encode()) for s in shards}) == 8
    for s in shards:
        assert key_slot(s.stream.encode()) == key_slot(s.dead.encode())
        assert s.stream.startswith("qnp:")  # a test's prefix cleanup still finds them


def test_no_shards_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one shard"):
        RedisNames().event_shards(0)
