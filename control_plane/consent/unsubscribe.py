"""One-click unsubscribe tokens (RFC 8058): ``<account id>.<HMAC>``, the HMAC-SHA256 of
the account id and the purpose under a key derived from QNP_SESSION_SECRET, so a link
names exactly one account and cannot be made for another without the secret. Tokens do
not expire (a link in an old e-mail must still work); changing the secret invalidates
them all, once ``QNP_SESSION_SECRET_PREVIOUS`` no longer holds the old one. Pure code:
stdlib only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Sequence

PURPOSE = "marketing_email"


def _mac(secret: str, account_id: uuid.UUID, purpose: str) -> str:
    key = hashlib.sha256(b"qnp-unsubscribe:" + secret.encode()).digest()
    digest = hmac.new(key, f"unsubscribe:{purpose}:{account_id}".encode(),
                      hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def make_token(secret: str, account_id: uuid.UUID, purpose: str = PURPOSE) -> str:
    return f"{account_id.hex}.{_mac(secret, account_id, purpose)}"


def account_of(secrets: Sequence[str], token: str, purpose: str = PURPOSE
               ) -> uuid.UUID | None:
    """The account a genuine token names under any of ``secrets`` (the session secret
    and the one before its last rotation); None for anything else."""
    raw_id, _, mac = token.partition(".")
    if len(raw_id) != 32 or not mac or len(token) > 100:
        return None
    try:
        account_id = uuid.UUID(hex=raw_id)
    except ValueError:
        return None
    if not any(hmac.compare_digest(_mac(secret, account_id, purpose).encode(), mac.encode())
               for secret in secrets):
        return None
    return account_id
