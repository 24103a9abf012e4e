"""The whole life of an account, to its purge (issue 14's deletion test): sign-up
through the real OIDC mock, a top-up through localstripe, a key, traffic through a
real proxy from a client IP of its own, ingest, a consent, a queued e-mail, the export,
the deletion; keys refused, sessions gone; then the maintenance job on a clock past the
grace: the Stripe customer deleted, and the e-mail, name, IP and account id nowhere —
every row of every Postgres table, every Redis key and value, the captured logs, the
proxy's spool — nor the receipt link and card of the top-up, nor the consent the
person's browser gave before signing in, while the billing rows sum to what they did,
under an anonymous id."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import openai
import pytest
import redis.asyncio as aioredis
import stripe

from control_plane.billing.gateway import StripeGateway
from control_plane.consent import records
from control_plane.ingest import Consumer
from control_plane.mail import outbox
from control_plane.metrics import Metrics
from control_plane.privacy.purge import Purger
from control_plane.service import maintain_once
from control_plane.trim import Trimmer
from control_plane.web.state import STORES
from tests.canary import found_in_postgres, found_in_redis
from tests.control_plane.billing.conftest import (  # noqa: F401  (fixtures)
    billing_web,
    localstripe,
    register_webhook,
    stripe_client,
)
from tests.control_plane.billing.flows import start_topup
from tests.control_plane.privacy.deletion_flows import csrf_headers, delete_account
from tests.control_plane.web.conftest import Web, sign_in_new_user
from tests.proxy.conftest import (  # noqa: F401  (fixtures)
    GatewayFactory,
    mock_anthropic,
    mock_gemini,
    start_gateway,
)
from tests.support import free_port

pytestmark = pytest.mark.timeout(180)
HANG_GUARD = 300  # polls of 0.05 s: fifteen seconds for what takes milliseconds


async def _pay_and_credit(web: Web, client: stripe.StripeClient, headers: dict[str, str]
                          ) -> str:
    r = await start_topup(web, headers, 2000)
    intent = (await r.json())["data"]["payment_intent_id"]
    method = await client.v1.payment_methods.create_async(
        {"type": "card", "card": {"number": "4242424242424242", "exp_month": 12,
                                  "exp_year": 2030, "cvc": "123"}})
    await client.v1.payment_intents.update_async(intent, {"payment_method": method.id})
    await client.v1.payment_intents.confirm_async(intent)
    r = await web.client.post("/api/v1/credits/topup/complete", headers=headers,
                              json={"payment_intent_id": intent})
    assert (await r.json())["data"]["credited"] is True, await r.text()
    return str(intent)


async def _ingest(web: Web, pool: asyncpg.Pool, redis: aioredis.Redis, account: uuid.UUID
                  ) -> None:
    consumer = Consumer(web.settings, pool, redis, Metrics())
    for _ in range(HANG_GUARD):
        await consumer.run_once()
        if await pool.fetchval("SELECT count(*) FROM usage_logs WHERE account_id = $1",
                               account):
            return
    pytest.fail("the request's event never reached usage_logs")


async def _refused(client: openai.AsyncOpenAI) -> int:
    try:
        await client.chat.completions.create(model="demo-mini",
                                             messages=[{"role": "user", "content": "hi"}])
    except openai.APIStatusError as e:
        return e.status_code
    return 200


async def _lag(redis: aioredis.Redis, stream: str) -> tuple[int, int]:
    """(entries the ingest group has not read, entries it read and not stored)."""
    (group,) = await redis.xinfo_groups(stream)
    return int(group["lag"]), int(group["pending"])


async def _revoked_then_purged(web: Web, pool: asyncpg.Pool, redis: aioredis.Redis,
                               client: openai.AsyncOpenAI, account: uuid.UUID) -> None:
    """The key refused as soon as the proxy hears of it, the session gone; then the
    maintenance job, on a clock past the grace, waits for ingest to store every event
    from before the deletion settled, and purges; the key is still refused."""
    names = web.settings.names
    for _ in range(HANG_GUARD):  # every proxy drops the key on the revocation message
        if (status := await _refused(client)) != 200:
            break
        await asyncio.sleep(0.05)
    assert status == 401
    assert (await web.client.get("/api/v1/session")).status == 401
    for _ in range(HANG_GUARD):  # the refusals' events reach the stream
        if (await _lag(redis, names.events))[0]:
            break
        await asyncio.sleep(0.05)
    later = datetime.now(UTC) + timedelta(days=web.settings.deletion_grace_days, hours=1)
    metrics = Metrics()
    stripe_gateway = StripeGateway(web.settings.billing)
    purger = Purger(redis, names, stripe_gateway, (names.events,))
    trimmer = Trimmer(redis, [names.events], metrics)
    try:
        await maintain_once(web.settings, pool, trimmer, metrics, clock=lambda: later,
                            purger=purger)
        assert await pool.fetchval("SELECT status FROM accounts WHERE id = $1",
                                   account) == "deleting"  # ingest is behind: not yet
        consumer = Consumer(web.settings, pool, redis, Metrics())
        for _ in range(HANG_GUARD):
            await consumer.run_once()
            if await _lag(redis, names.events) == (0, 0):
                break
        await maintain_once(web.settings, pool, trimmer, metrics, clock=lambda: later,
                            purger=purger)
    finally:
        await stripe_gateway.close()
    assert await pool.fetchval("SELECT count(*) FROM accounts WHERE id = $1", account) == 0
    assert await _refused(client) == 401


async def _stripe_deleted(client: stripe.StripeClient, customer: str) -> bool:
    """Stripe answers a deleted customer with ``deleted: true``; localstripe with 404."""
    try:
        found = await client.v1.customers.retrieve_async(customer)
    except stripe.InvalidRequestError as e:
        return e.http_status == 404
    return found.get("deleted") is True


async def test_the_life_of_an_account_ends_with_only_anonymous_billing_left(
        billing_web: Web, stripe_client: stripe.StripeClient,  # noqa: F811
        localstripe: str, start_gateway: GatewayFactory, redis: aioredis.Redis,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    web, names = billing_web, billing_web.settings.names
    pool: asyncpg.Pool = web.client.server.app[STORES].pool
    tag = secrets.token_hex(4)
    person = {"sub": f"canary-{tag}", "email": f"canary-{tag}@example.test",
              "email_verified": True, "name": f"Canary Person {tag}"}
    ip = str(ipaddress.IPv6Address(f"2001:db8::{tag[:4]}:{tag[4:]}"))
    # Only the return path credits: no webhook of localstripe's may race the purge.
    await register_webhook(localstripe, f"http://127.0.0.1:{free_port()}/webhooks/stripe")
    await redis.set(names.published, "test")  # Redis is filled, as the reconciler marks

    me = await sign_in_new_user(web, person)
    account = uuid.UUID(me["account_id"])
    headers = await csrf_headers(web)
    intent = await _pay_and_credit(web, stripe_client, headers)
    customer = await pool.fetchval(
        "SELECT stripe_customer_id FROM billing_customers WHERE account_id = $1", account)
    r = await web.client.post("/api/v1/keys", json={"name": f"laptop of {person['name']}"},
                              headers=headers)
    key = (await r.json())["key"]
    gateway = await start_gateway(QNP_TRUSTED_PROXIES="127.0.0.1/32")
    async with gateway.client(key, default_headers={"CF-Connecting-IP": ip}) as client:
        assert await _refused(client) == 200  # served, from the canary IP
    await _ingest(web, pool, redis, account)
    assert await pool.fetchval("SELECT host(source_ip) FROM usage_logs WHERE account_id = $1",
                               account) == ip
    # What Stripe shows of a paid top-up, which localstripe leaves out: a receipt link
    # (Stripe's page shows the customer's e-mail) and the card's brand and last 4.
    receipt = f"https://pay.stripe.com/receipts/canary-{tag}"
    await pool.execute(
        "UPDATE billing_topups SET receipt_url = $2, card_brand = coalesce(card_brand, "
        "'visa'), card_last4 = coalesce(card_last4, '4242') WHERE payment_intent_id = $1",
        intent, receipt)
    browser = uuid.uuid4()  # the consent cookie's id: a choice before sign-in, then
    async with pool.acquire() as conn:  # copied onto the account as sign-in does
        await records.record(conn, purpose="functional", granted=True, source="banner",
                             policy_version=web.settings.policy_version, browser_id=browser)
        assert await records.attach(conn, browser, account) == 1
        await records.record(conn, purpose="analytics", granted=True, source="settings",
                             policy_version=web.settings.policy_version, account_id=account)
        await outbox.enqueue(conn, to_address=person["email"], kind="transactional",
                             template="receipt", subject=f"Receipt for {person['name']}",
                             body="Thanks", account_id=account)
    export = await (await web.client.get("/api/v1/account/export")).text()
    # what the canary looks for was held
    assert person["email"] in export and ip in export and receipt in export
    billed = await pool.fetchrow(
        "SELECT (SELECT sum(amount_micros) FROM credit_ledger WHERE account_id = $1) AS l, "
        "(SELECT count(*) FROM credit_ledger WHERE account_id = $1) AS n, "
        "(SELECT sum(amount_cents) FROM billing_topups WHERE account_id = $1) AS t", account)
    assert billed["n"] >= 2  # the top-up and the request's debit

    await delete_account(web, headers)
    # Probes of the key from here on come from another address: a request after the
    # deletion is a new request log (kept 30 days), not the deleted account's data.
    client = gateway.client(key)
    try:
        await _revoked_then_purged(web, pool, redis, client, account)
    finally:
        await client.close()
    assert await _stripe_deleted(stripe_client, customer)
    anonymous = await pool.fetchval(
        "SELECT account_id FROM billing_topups WHERE payment_intent_id = $1", intent)
    assert anonymous != account
    after = await pool.fetchrow(
        "SELECT (SELECT sum(amount_micros) FROM credit_ledger WHERE account_id = $1) AS l, "
        "(SELECT count(*) FROM credit_ledger WHERE account_id = $1) AS n, "
        "(SELECT sum(amount_cents) FROM billing_topups WHERE account_id = $1) AS t",
        anonymous)
    assert dict(after) == dict(billed)
    assert await pool.fetchval(
        "SELECT count(*) FROM billing_topups WHERE account_id = $1 AND (card_brand IS NOT "
        "NULL OR card_last4 IS NOT NULL OR receipt_url IS NOT NULL)", anonymous) == 0
    assert await pool.fetchval("SELECT outcome FROM privacy_requests WHERE account_id = $1 "
                               "AND type = 'deletion'", anonymous) == "fulfilled"

    needles = [person["email"], person["name"], ip]
    assert len(await pool.fetch("SELECT 1 FROM pg_tables WHERE schemaname = 'public'")) > 20
    found = await found_in_postgres(pool, [*needles, str(account), receipt, str(browser)])
    found += await found_in_redis(redis, [*needles, str(account)])
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    found += [f"{n} in the logs" for n in needles if n.lower() in logged.lower()]
    spool = Path(gateway.settings.spool_dir)
    for path in spool.rglob("*") if spool.exists() else []:
        if path.is_file():
            text = path.read_bytes().decode(errors="replace").lower()
            found += [f"{n} in {path.name}" for n in needles if n.lower() in text]
    assert found == []
