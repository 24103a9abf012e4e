"""Every Redis key, channel, stream and group name the system uses, in one place.

Names hang off a prefix (default ``qnp``) so that one Redis can hold several
deployments, and tests can clean up exactly what they wrote. Every name the admission
scripts touch together carries the account's hash tag ``{a:<id>}``, so one script's keys
land in one Redis Cluster slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

DEFAULT_PREFIX = "qnp"
INGEST_GROUP = "ingest"


def spend_periods(unix_s: int) -> dict[str, int]:
    """The period numbers a key's spend is kept under (see ``RedisNames.key_spend``), as
    the admission scripts compute them from Redis's clock: UTC days since 1970-01-01,
    weeks starting on Monday (week 0 began on Monday 1969-12-29), months as
    ``year * 12 + month - 1``. Keys are the ``limit_reset`` values they serve."""
    day = unix_s // 86400
    when = time.gmtime(unix_s)
    return {"daily": day, "weekly": (day + 3) // 7,
            "monthly": when.tm_year * 12 + when.tm_mon - 1}


@dataclass(frozen=True, slots=True)
class EventShard:
    """One shard of the event stream: the stream proxies add to, and its dead letters."""

    stream: str
    dead: str


@dataclass(frozen=True, slots=True)
class RedisNames:
    prefix: str = DEFAULT_PREFIX

    def key_record(self, key_id: str) -> str:
        """String: the orjson key record the control plane publishes for one API key."""
        return f"{self.prefix}:keyrec:{key_id}"

    @property
    def key_changes(self) -> str:
        """Pub/sub channel: a message (the key id) whenever a key record changes."""
        return f"{self.prefix}:keys:changed"

    @property
    def events(self) -> str:
        """Stream: one entry per request, field ``e`` holding the encoded event."""
        return f"{self.prefix}:events"

    @property
    def events_dead(self) -> str:
        """Stream: entries ingest could not decode or store, with the reason."""
        return f"{self.prefix}:events:dead"

    def event_shards(self, count: int) -> tuple[EventShard, ...]:
        """The event stream split over ``count`` stream keys, each with its dead letters.

        One shard is the unsharded stream, ``events`` and ``events_dead``, names
        unchanged. Several: shard ``i`` is ``<prefix>:{ev<i>}:events`` and its dead
        letters ``<prefix>:{ev<i>}:events:dead``; each shard's hash tag is its own, so
        Redis Cluster spreads the shards over its masters, and a shard's two streams
        share a slot (ingest dead-letters and acks them in one MULTI).
        """
        if count < 1:
            raise ValueError("an event stream has at least one shard")
        if count == 1:
            return (EventShard(self.events, self.events_dead),)
        return tuple(
            EventShard(f"{self.prefix}:{{ev{i}}}:events", f"{self.prefix}:{{ev{i}}}:events:dead")
            for i in range(count)
        )

    def event_streams(self, count: int) -> tuple[str, ...]:
        """The stream keys of ``event_shards(count)``: where proxies write events."""
        return tuple(shard.stream for shard in self.event_shards(count))

    @property
    def ingest_group(self) -> str:
        return INGEST_GROUP

    def account_tag(self, account_id: str) -> str:
        """Hash tag shared by every per-account key an atomic script touches."""
        return f"{self.prefix}:{{a:{account_id}}}"

    def account_state(self, account_id: str) -> str:
        """Hash: an account's live state for admission, published by the control plane.

        Fields: ``bal`` (live balance, integer micro-dollars), ``status`` (active or
        suspended), ``rpm``, ``tpm``, ``conc`` (account limits; absent or 0 = none),
        ``credited`` (the highest credit-ledger id already added to ``bal``, so a
        credit is applied exactly once). The proxy's scripts never create this hash.
        """
        return f"{self.account_tag(account_id)}:state"

    def admission_keys(self, account_id: str, key_id: str, *,
                       credit_limited: bool = False) -> list[str]:
        """The keys one admission or settlement script touches, in the scripts' order.

        state, request logs (account, key), token logs (account, key), token totals,
        in-flight sets (account, key), credit reservations, recently settled requests;
        then, for a key with a credit limit only, its spend and its holds.
        """
        t = self.account_tag(account_id)
        keys = [
            f"{t}:state",
            f"{t}:req:a", f"{t}:req:k:{key_id}",
            f"{t}:tok:a", f"{t}:tok:k:{key_id}",
            f"{t}:toktot",
            f"{t}:conc:a", f"{t}:conc:k:{key_id}",
            f"{t}:resv",
            f"{t}:settled",
        ]
        if credit_limited:
            keys += [self.key_spend(account_id, key_id),
                     self.key_spend_holds(account_id, key_id)]
        return keys

    def key_spend(self, account_id: str, key_id: str) -> str:
        """Hash: what a credit-limited key has spent, per period, written by the proxy's
        admission scripts (the control plane reads it for ``limit_remaining``).

        Fields (integers): ``day``, ``week``, ``month`` — the periods the ``spent_*``
        fields belong to, as ``spend_periods`` numbers them; ``spent_day``,
        ``spent_week``, ``spent_month``, ``spent_total`` — settled cost in micro-dollars
        in that day / week / month and ever; ``held`` — micro-dollars reserved by
        requests in flight. A ``spent_*`` field whose period is not the current one
        (compare with ``spend_periods(now)``) means 0 spent in the current period: the
        scripts roll periods over in place, on the next request. So the key's usage in
        its current period is ``spent_<period>`` (``spent_total`` without a reset), and
        ``limit_remaining = limit - usage - held``. Spend is tracked only while the key
        has a credit limit: a limit set later starts from 0 here unless the control
        plane seeds the fields from its ledger. The hash has no TTL (a lifetime cap must
        outlive any period): it is the control plane's to delete when it deletes the key.
        """
        return f"{self.account_tag(account_id)}:kspend:{key_id}"

    def key_spend_holds(self, account_id: str, key_id: str) -> str:
        """Sorted set: a credit-limited key's reservations in flight, members
        ``<request id>:<micro-dollars>`` scored by when they lapse (a proxy that died
        before settling frees its hold after the in-flight lifetime). Proxy-only."""
        return f"{self.account_tag(account_id)}:kspend:{key_id}:held"

    def account_reservations(self, account_id: str) -> str:
        """Hash: request id → credit reserved and not yet settled (micro-dollars)."""
        return f"{self.account_tag(account_id)}:resv"

    @property
    def published(self) -> str:
        """String: set once the control plane has published every key and account.

        Its absence tells the control plane that Redis lost its data and must be refilled.
        """
        return f"{self.prefix}:published"


    # The public web service (control plane, role web). Nothing here is read by the
    # proxy; none of it holds an email or a name except ``signup``, which lives minutes.

    @property
    def session_revocations(self) -> str:
        """Pub/sub channel: a web session id (or ``*``: all) whose cached state is stale."""
        return f"{self.prefix}:web:sessions:revoked"

    def signin_state(self, state: str) -> str:
        """String, minutes: an OIDC sign-in in progress (provider, nonce, PKCE verifier,
        where to go next), keyed by its ``state``; read once with GETDEL."""
        return f"{self.prefix}:web:signin:{state}"

    def account_restore(self, digest: str) -> str:
        """String, minutes: a sign-in to an account in its deletion grace period (account
        and user ids), waiting for the person to keep the account; named by a digest of
        the browser's restore cookie, read once with GETDEL."""
        return f"{self.prefix}:web:restore:{digest}"

    def signup(self, token: str) -> str:
        """String, minutes: a first sign-in's verified identity waiting for the person to
        confirm 18+ and accept the terms; nothing is in Postgres before that."""
        return f"{self.prefix}:web:signup:{token}"
