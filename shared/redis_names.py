"""Every Redis key, channel, stream and group name the system uses, in one place.

Names hang off a prefix (default ``qnp``) so that one Redis can hold several
deployments, and tests can clean up exactly what they wrote. Every name the admission
scripts touch together carries the account's hash tag ``{a:<id>}``, so one script's keys
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

    def account_state(self, account_id: str) -> str:
        """Hash: an account's live state for admission, published by the control plane.

        Fields: ``bal`` (live balance, integer micro-dollars), ``status`` (active or
        suspended), ``rpm``, ``tpm``, ``conc`` (account limits; absent or 0 = none),
        ``credited`` (the highest credit-ledger id already added to ``bal``, so a
        credit is applied exactly once). The proxy's scripts never create this hash.
        """
        return f"{self.account_tag(account_id)}:state"

    def admission_keys(self, account_id: str, key_id: str) -> list[str]:
        """The keys one admission or settlement script touches, in the scripts' order.

        state, request logs (account, key), token logs (account, key), token totals,
        in-flight sets (account, key), credit reservations, recently settled requests.
        """
        t = self.account_tag(account_id)
        return [
            f"{t}:state",
            f"{t}:req:a", f"{t}:req:k:{key_id}",
            f"{t}:tok:a", f"{t}:tok:k:{key_id}",
            f"{t}:toktot",
            f"{t}:conc:a", f"{t}:conc:k:{key_id}",
            f"{t}:resv",
            f"{t}:settled",
        ]

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

    def signup(self, token: str) -> str:
        """String, minutes: a first sign-in's verified identity waiting for the person to
        confirm 18+ and accept the terms; nothing is in Postgres before that."""
        return f"{self.prefix}:web:signup:{token}"
