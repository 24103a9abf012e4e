"""``make run`` shows a newcomer the mail the control plane sends: a row queued in the
outbox comes out, headers and body, in make run's own output (a local aiosmtpd). And it
lets them top up (one make run for both: starting it is most of the cost): localstripe
serves the control plane's Stripe API and the credits page's Stripe.js, and its signed
webhooks reach our /webhooks/stripe, whose signature check passes. The browser journey
of a top-up is tests/browser/test_topup.py."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import stripe

from control_plane.mail.outbox import enqueue
from shared.redis_names import RedisNames
from tests.support import ModuleProcess

BANNER = "QNP gateway is running"


async def test_make_run_prints_each_mail_it_sends_and_takes_payments(
    tmp_path: Path, scratch_database_url: str, redis_url: str, redis_names: RedisNames,
) -> None:
    env = {**os.environ, "DATABASE_URL": scratch_database_url, "REDIS_URL": redis_url,
           "QNP_REDIS_PREFIX": redis_names.prefix, "QNP_BCRYPT_ROUNDS": "4"}
    env.pop("SMTP_URL", None)
    subject = f"Welcome {uuid.uuid4().hex}"
    with ModuleProcess("devstack.run", log_path=tmp_path / "make-run.log", env=env) as run:
        banner = run.wait_for_log(BANNER, timeout=120)
        assert "E-mail goes to a local SMTP server (smtp://127.0.0.1:" in banner
        conn = await asyncpg.connect(scratch_database_url)
        try:
            await enqueue(conn, to_address="dev@example.test", kind="transactional",
                          template="welcome", subject=subject, body="Hello from QNP.\n")
        finally:
            await conn.close()
        log = run.wait_for_log(f"Subject: {subject}", timeout=60)  # one poll, bounded
        await _takes_payments(run, banner)
        assert run.stop() == 0
    assert "To: dev@example.test" in log
    assert "Hello from QNP." in log


async def _takes_payments(run: ModuleProcess, banner: str) -> None:
    found = re.search(r"payments go to localstripe \((http://127\.0\.0\.1:\d+),", banner)
    assert found, banner[-2000:]
    base = found[1]
    assert "Card 4242 4242 4242 4242 pays" in banner
    async with aiohttp.ClientSession() as s, s.get(f"{base}/js.stripe.com/v3/") as r:
        script = await r.text()
    assert "localstripe" in script and "payment_method_data" in script  # with our confirm
    http = stripe.AIOHTTPClient()
    try:
        client = stripe.StripeClient("sk_test_make_run", http_client=http,
                                     base_addresses={"api": base})
        paid = await client.v1.payment_intents.create_async(
            {"amount": 500, "currency": "usd", "payment_method": "pm_card_visa",
             "confirm": True})
    finally:
        await http.close_async()
    assert paid.status == "succeeded"
    # Signed by localstripe with make run's secret and verified by our endpoint: a
    # payment we did not start is acknowledged as "unmatched" and credits nothing.
    run.wait_for_log("type=payment_intent.succeeded outcome=unmatched", timeout=30)
