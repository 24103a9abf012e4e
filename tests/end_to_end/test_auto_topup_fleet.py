"""Auto top-up under load, as production runs it (issue 13): 200 concurrent requests
drain an account below its threshold through FOUR proxy processes, while TWO
control-plane ingest replicas (each with its balance watch and charger) ingest the
events. Exactly one off-session charge reaches Stripe (localstripe, listed through the
official SDK), it is credited once, one low-balance e-mail is queued, and the balance
is spendable afterwards."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe

from control_plane import keys, ledger
from control_plane.billing import auto_topup, topups
from control_plane.billing.gateway import StripeGateway
from control_plane.connections import open_pool, open_redis
from devstack.upstream_openai import MockOpenAIUpstream
from shared.redis_names import RedisNames
from tests.control_plane.billing.conftest import (  # noqa: F401  (fixtures)
    billing_env,
    localstripe,
    stripe_client,
)
from tests.control_plane.factories import make_settings
from tests.proxy.conftest import proxy_env, write_catalog
from tests.support import ModuleProcess, free_port, wait_for_http

pytestmark = pytest.mark.timeout(240)

PROXIES, INGESTERS, REQUESTS = 4, 2, 200
DOLLAR = 1_000_000
# ~18 tokens a request at $500 per million: about $0.009 each, so the burst spends well
# past the $0.20 between the starting balance and the threshold.
PRICEY = """
[models."pricey"]
provider = "mock"
upstream_model = "demo-mini-2024"
prompt_price = 500
completion_price = 500
"""
BODY = b'{"model":"pricey","max_tokens":20,"messages":[{"role":"user","content":"Hi"}]}'
HANG_GUARD_S = 90.0


async def _until(what: str, probe: Any) -> Any:
    """Wait for ``probe()`` to return something truthy, under a hang guard."""
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            while not (value := await probe()):
                await asyncio.sleep(0.05)
            return value
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def _post(session: aiohttp.ClientSession, url: str, key: str) -> int:
    async with session.post(url + "/v1/chat/completions", data=BODY, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"}) as r:
        await r.read()
        return r.status


async def test_a_drained_balance_is_topped_up_exactly_once_across_the_fleet(
        tmp_path: Path, migrated_url: str, redis_url: str, redis_names: RedisNames,
        mock_upstream: MockOpenAIUpstream, localstripe: str,  # noqa: F811
        stripe_client: stripe.StripeClient) -> None:  # noqa: F811
    env = {"DATABASE_URL": migrated_url, "REDIS_URL": redis_url,
           "QNP_REDIS_PREFIX": redis_names.prefix, "QNP_INGEST_BLOCK_MS": "50",
           "QNP_BALANCE_SWEEP_S": "0.2", "QNP_LOG_LEVEL": "DEBUG", "PATH": "/usr/bin:/bin",
           **billing_env(localstripe)}
    settings = make_settings(migrated_url, redis_url, redis_names, **billing_env(localstripe))
    pool = await open_pool(settings, min_size=1, max_size=4)
    redis = open_redis(settings)
    gateway = StripeGateway(settings.billing)
    procs: list[ModuleProcess] = []
    try:
        # The account: an owner to e-mail, a key, $1.20 of credit, a saved card, auto
        # top-up of $10 below $1.00 and the low-balance e-mail below $1.10.
        account = uuid.uuid4()
        await pool.execute("INSERT INTO accounts (id, name) VALUES ($1, 'fleet')", account)
        user = uuid.uuid4()
        await pool.execute("INSERT INTO users (id, email, email_verified) "
                           "VALUES ($1, $2, true)", user, f"fleet-{user.hex[:8]}@example.test")
        await pool.execute("INSERT INTO memberships (account_id, user_id, role) "
                           "VALUES ($1, $2, 'owner')", account, user)
        issued = await keys.issue_key(pool, redis, settings.names, str(account), "fleet",
                                      bcrypt_rounds=4)
        await ledger.credit(pool, redis, settings.names, str(account), "adjustment",
                            1_200_000)
        setup = await auto_topup.start_card_setup(pool, gateway, account, uuid.uuid4())
        await stripe_client.v1.setup_intents.confirm_async(
            setup["setup_intent_id"], {"payment_method": "pm_card_visa"})
        current = await auto_topup.save_card(pool, gateway, account,
                                             setup["setup_intent_id"])
        await auto_topup.configure(pool, account, auto_topup.parse(
            {"enabled": True, "threshold_cents": 100, "amount_cents": 1000,
             "low_balance_cents": 110}, current, settings.billing))
        customer = await topups.customer_for(pool, gateway, account)

        for n in range(INGESTERS):
            procs.append(ModuleProcess(
                "control_plane", ["serve", "--role", "ingest"],
                log_path=tmp_path / f"ingest-{n}.log",
                env={**env, "QNP_CONSUMER_NAME": f"ingest-{n}"}))
        for p in procs:
            await asyncio.to_thread(p.wait_for_log, "serving roles=ingest", 60.0)
        catalog = write_catalog(tmp_path, mock_upstream.base_url, extra=PRICEY)
        urls = []
        for n in range(PROXIES):
            port = free_port()
            penv = proxy_env(redis_url, redis_names, catalog, QNP_PROXY_PORT=str(port),
                             QNP_SHUTDOWN_GRACE="2", QNP_NODE_ID=f"proxy-{n}")
            penv["QNP_SPOOL_DIR"] = str(tmp_path / f"spool-{n}")
            procs.append(ModuleProcess("proxy", log_path=tmp_path / f"proxy-{n}.log",
                                       env=penv))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            await wait_for_http(url + "/readyz", expect_status=200)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            statuses = Counter(await asyncio.gather(*(
                _post(s, urls[i % PROXIES], issued.key) for i in range(REQUESTS))))
            assert set(statuses) <= {200, 402} and statuses[200] > 30, statuses

            async def ingested() -> bool:
                n = await pool.fetchval("SELECT count(*) FROM usage_logs "
                                        "WHERE account_id = $1", account)
                return bool(n >= REQUESTS)

            async def credited() -> bool:
                n = await pool.fetchval("SELECT count(*) FROM credit_ledger "
                                        "WHERE account_id = $1 AND kind = 'topup'", account)
                return bool(n >= 1)

            async def rearmed() -> bool:
                # A check after the credit saw the balance above the threshold again.
                return bool(await pool.fetchval(
                    "SELECT armed FROM balance_triggers WHERE account_id = $1 "
                    "AND kind = 'auto_topup'", account))

            await _until("all 200 events ingested", ingested)
            await _until("the top-up credited", credited)
            await _until("auto top-up re-armed", rearmed)

            # Exactly one off-session charge at Stripe, for $10 + the fee, and one credit.
            listed = await stripe_client.v1.payment_intents.list_async({"limit": 100})
            ours = [pi async for pi in listed.auto_paging_iter()
                    if pi.customer == customer]
            assert len(ours) == 1, [pi.id for pi in ours]
            assert (ours[0].amount, ours[0].status) == (1000 + 50 + 30, "succeeded")
            rows = await pool.fetch("SELECT kind, amount_micros, reference FROM credit_ledger"
                                    " WHERE account_id = $1 AND kind <> 'debit'", account)
            assert sorted((r["kind"], r["amount_micros"]) for r in rows) == \
                [("adjustment", 1_200_000), ("topup", 10 * DOLLAR)]
            assert rows and f"stripe:{ours[0].id}" in {r["reference"] for r in rows}
            assert await pool.fetchval("SELECT count(*) FROM auto_topup_charges "
                                       "WHERE account_id = $1", account) == 1
            assert await pool.fetchval(
                "SELECT count(*) FROM email_outbox WHERE account_id = $1 "
                "AND template = 'low_balance'", account) == 1

            # Spendable on the fleet: a request costing more than what was left passes.
            assert await _post(s, urls[0], issued.key) == 200
        found = await ledger.get_balance(pool, redis, settings.names, str(account))
        assert found.ledger_micros > 10 * DOLLAR
    finally:
        for p in procs:
            p.stop()
        await gateway.close()
        await redis.aclose()
        await pool.close()
    for p in procs:
        assert "Traceback" not in p.log_text(), p.log_path.name
