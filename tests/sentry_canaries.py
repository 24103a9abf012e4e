"""Canaries for the Sentry tests: strings that stand for what must never reach an error
report (prompt text, reply text, an API key, an e-mail address), and the check that
none is anywhere in what the sink received."""

from __future__ import annotations

import secrets

from tests.sentry_sink import SentrySink

TAG = secrets.token_hex(6)
PROMPT = f"PROMPT-CANARY-{TAG} tell me a secret"
REPLY = f"REPLY-CANARY-{TAG} here is the secret"
EMAIL = f"email-canary-{TAG}@example.test"


def assert_no_canary(sink: SentrySink, *canaries: str) -> None:
    """No canary in any recorded envelope: URL, request headers, body (decompressed)."""
    assert sink.envelopes, "nothing reached the sink: the test proves nothing"
    assert not sink.rejected, sink.rejected
    for envelope in sink.envelopes:
        text = envelope.everything()
        for canary in canaries:
            assert canary not in text, f"canary {canary[:24]!r}… reached Sentry:\n{text}"
