"""Which stores this process finds down, so an outage is one log line, not one per retry.

Ingest, the reconciler and the maintenance job all retry against Postgres and Redis;
each reports here. The first failure of an outage is one WARNING naming the store and
the error class (never a traceback: the cause is known and retried); the first success
after it is one INFO line. Must not import other control-plane modules or ``proxy``.
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

POSTGRES = "postgres"
REDIS = "redis"


def store_of(error: BaseException) -> str:
    """The store an error of a store call came from. redis-py wraps its socket errors
    in ``RedisError``; everything else a store call raises (asyncpg errors, refused or
    timed-out connects) is Postgres'."""
    return REDIS if isinstance(error, RedisError) else POSTGRES


class Outages:
    """The stores currently down, as seen by this process's tasks."""

    def __init__(self) -> None:
        self._down: set[str] = set()

    def failed(self, store: str, cause: BaseException, during: str) -> None:
        if store in self._down:
            log.debug("%s still unavailable during %s (%s)", store, during,
                      type(cause).__name__)
            return
        self._down.add(store)
        log.warning("%s unavailable (%s) during %s; retrying until it is back",
                    store, type(cause).__name__, during)

    def ok(self, store: str) -> None:
        if store in self._down:
            self._down.discard(store)
            log.info("%s is back", store)

    def is_down(self, store: str) -> bool:
        return store in self._down
