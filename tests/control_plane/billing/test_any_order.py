"""Fifty deliveries of ten Stripe events for one payment — its success (twice, under two
event ids), two refunds, a dispute opened, withdrawn, updated, won and reinstated, and a
type we do not handle — each five times, in a seeded random order, concurrently against
TWO web app instances on one database: exactly the ledger the events imply."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest

from control_plane.web.state import STORES
from shared.redis_names import RedisNames
from tests.control_plane.billing.conftest import billing_env, event
from tests.control_plane.billing.flows import balance, signed_in, start_topup
from tests.control_plane.billing.stripe_events import (
    deliver,
    dispute,
    event_id,
    refunded,
    succeeded,
)
from tests.control_plane.web.conftest import Web, serve_web, web_settings
from tests.support import free_port

pytestmark = pytest.mark.timeout(180)

SEED = 1313
CHARGED = 2130  # $20 of credit plus the fixture's fee


@pytest.fixture
async def replica(migrated_url: str, redis_url: str, redis_names: RedisNames,
                  oidc_mock: str, localstripe: str) -> AsyncIterator[Web]:
    """A second web app on the same database and Redis as ``billing_web``."""
    port = free_port()
    settings = web_settings(migrated_url, redis_url, redis_names, port, [],
                            **billing_env(localstripe))
    async with serve_web(settings) as w:
        yield w


def _unknown_types(web: Web) -> float:
    registry = web.client.server.app[STORES].metrics.registry
    return registry.get_sample_value("qnp_billing_webhook_unknown_types_total",
                                     {"type": "charge.updated"}) or 0.0


async def test_fifty_deliveries_in_any_order_on_two_replicas_leave_the_implied_ledger(
        billing_web: Web, replica: Web) -> None:
    account, headers = await signed_in(billing_web)
    r = await start_topup(billing_web, headers, 2000)
    intent = (await r.json())["data"]["payment_intent_id"]
    charge, dp = "ch_" + uuid.uuid4().hex[:24], "dp_" + uuid.uuid4().hex[:20]
    re_a, re_b = "re_a" + charge, "re_b" + charge
    ten = [
        succeeded(intent, CHARGED), succeeded(intent, CHARGED),
        refunded(intent, charge, CHARGED, [(re_a, 500)]),
        refunded(intent, charge, CHARGED, [(re_a, 500), (re_b, 700)]),
        dispute("created", intent, charge, dp, 930, "needs_response"),
        dispute("funds_withdrawn", intent, charge, dp, 930, "needs_response"),
        dispute("updated", intent, charge, dp, 930, "under_review"),
        dispute("closed", intent, charge, dp, 930, "won"),
        dispute("funds_reinstated", intent, charge, dp, 930, "won"),
        event(event_id(), "charge.updated", {"id": charge, "object": "charge"}),
    ]
    deliveries = ten * 5
    random.Random(SEED).shuffle(deliveries)
    before = _unknown_types(billing_web) + _unknown_types(replica)

    outcomes = await asyncio.gather(*(deliver((billing_web, replica)[i % 2], body)
                                      for i, body in enumerate(deliveries)))

    # $20 credited once, $12 refunded, the dispute's $9.30 taken and given back.
    found = await balance(billing_web, account)
    assert (found.ledger_micros, found.live_micros) == (8_000_000, 8_000_000)
    assert outcomes.count("credited") == 1
    assert outcomes.count("ignored") == 5
    assert _unknown_types(billing_web) + _unknown_types(replica) - before == 5
    pool = billing_web.client.server.app[STORES].pool
    assert await pool.fetchval("SELECT count(*) FROM credit_ledger WHERE account_id = $1 "
                               "AND kind = 'topup'", uuid.UUID(account)) == 1
    # Each handled event stored once; the unhandled type only acknowledged and counted.
    assert await pool.fetchval("SELECT count(*) FROM billing_events "
                               "WHERE event_id = ANY($1::text[])",
                               [orjson_id(b) for b in ten]) == 9
    stores = billing_web.client.server.app[STORES]
    status = await stores.redis.hget(stores.settings.names.account_state(account), "status")
    assert status in (b"active", "active")  # the dispute was won: keys work


def orjson_id(body: bytes) -> str:
    value: str = orjson.loads(body)["id"]
    return value
