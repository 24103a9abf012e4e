"""Every Redis key, channel, stream and group name the system uses, in one place.

Names hang off a prefix (default ``qnp``) so that one Redis can hold several
deployments, and tests can clean up exactly what they wrote. Names that a later
admission script will touch together carry the account's hash tag ``{a:<id>}`` so they
land in one Redis Cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "qnp"
INGEST_GROUP = "ingest"


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

    @property
    def ingest_group(self) -> str:
        return INGEST_GROUP

    def account_tag(self, account_id: str) -> str:
        """Hash tag shared by every per-account key an atomic script touches."""
        return f"{self.prefix}:{{a:{account_id}}}"
