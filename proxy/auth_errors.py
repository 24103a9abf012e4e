"""Refusals that key authentication adds to the proxy's error hierarchy.

``VerificationThrottled``: too many key verifications failed for a key id or a client
IP (or too many wait for bcrypt): 429 with ``Retry-After``, recorded as rate limited.
``auth_unavailable``: the existing 503 ``AuthUnavailable`` with ``Retry-After``, for
when no verdict on a key can be had yet (Redis unreachable, or restarted empty and not
yet refilled). Must not import anything of the proxy but ``proxy.errors``.
"""

from __future__ import annotations

import math

from proxy.errors import AuthUnavailable, RateLimited


class VerificationThrottled(RateLimited):
    code = "auth_throttled"

    def __init__(self, scope: str, retry_after_s: float) -> None:
        super().__init__("API key verifications", max(1, math.ceil(retry_after_s * 1000)), {})
        self.scope = scope  # "key_id", "client_ip" or "queue": which limit refused


def auth_unavailable(retry_after_s: int) -> AuthUnavailable:
    """A 503 that tells the client when to retry (the static body stays the same)."""
    err = AuthUnavailable()
    err.headers["Retry-After"] = str(retry_after_s)
    return err
