"""Non-discrimination (issue 14, policy clause 9): an account that downloaded its
export, restricted processing and objected is admitted by the proxy's own key check
and admission script, and billed by ingest, exactly like one that did none of it."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest

from control_plane import ledger
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from control_plane.web.state import STORES
from proxy import errors as proxy_errors
from proxy.admission import Admission, AdmissionConfig
from proxy.app import connect_redis
from proxy.auth import Authenticator
from shared.events import STREAM_FIELD
from tests.control_plane.factories import make_event
from tests.control_plane.privacy.people import Person, person
from tests.control_plane.web.conftest import Web

TOPUP = 5_000_000


async def _funded_key(web: Web, pool: asyncpg.Pool, who: Person) -> tuple[str, str]:
    stores = web.client.app[STORES]
    await ledger.credit(pool, stores.redis, web.settings.names, who.me["account_id"],
                        "topup", TOPUP, f"nd-{who.me['account_id']}")
    r = await web.client.post("/api/v1/keys", json={"name": "app", "limit": 3},
                              headers=who.api)
    assert r.status == 201
    body = await r.json()
    return body["key"], body["data"]["hash"]


def _same_shape(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if "reset" not in k}


async def test_exercising_rights_changes_neither_admission_nor_billing(
    web: Web, pool: asyncpg.Pool, redis_url: str
) -> None:
    exercised, control = await person(web), await person(web)
    keys = {p.me["account_id"]: await _funded_key(web, pool, p) for p in (exercised, control)}
    base = "/api/v1/account/privacy"
    r = await web.client.get("/api/v1/account/export", headers=exercised.api)
    assert r.status == 200
    await r.read()
    for method, path, body in (
            ("PUT", "restriction", {"restricted": True}),
            ("POST", "objection", {"purpose": "analytics", "objected": True}),
            ("POST", "objection", {"purpose": "service_improvement", "objected": True}),
            ("POST", "objection", {"purpose": "rate_limiting", "objected": True})):
        r = await web.client.request(method, f"{base}/{path}", json=body,
                                     headers=exercised.api)
        assert r.status in (200, 201), await r.text()
    assert await pool.fetchval("SELECT count(*) FROM privacy_requests WHERE account_id = $1",
                               uuid.UUID(exercised.me["account_id"])) == 5

    names = web.settings.names
    client = connect_redis(redis_url)  # the proxy's own client, key check and admission
    try:
        auth = Authenticator(client, names, ttl=1.0, max_entries=100)
        admission = Admission(client, names, AdmissionConfig())
        seen: dict[str, Any] = {}
        for who in (exercised, control):
            account = who.me["account_id"]
            secret, key_id = keys[account]
            record = await auth.authenticate(secret)
            assert (record.account_id, record.status) == (account, "active")
            ticket = await admission.admit(record, str(uuid.uuid4()), 100, 1234)
            with pytest.raises(proxy_errors.KeyLimitExceeded):  # past the key's $3 limit
                await admission.admit(record, str(uuid.uuid4()), 100, 3_500_000)
            state = await client.hgetall(names.account_state(account))
            seen[account] = (record.limits, record.credit_limit_micros, ticket.mode,
                             _same_shape(ticket.headers),
                             # resv and credited are ids of this account's own rows
                             {k: v for k, v in state.items()
                              if k not in (b"resv", b"credited")})
        assert seen[exercised.me["account_id"]] == seen[control.me["account_id"]]
    finally:
        await client.aclose()

    # Billing: the same request costs both the same, once.
    stores = web.client.app[STORES]
    for who in (exercised, control):
        account = who.me["account_id"]
        event = make_event(account, key_id=keys[account][1], cost_micros=1234)
        await stores.redis.xadd(names.events, {STREAM_FIELD: event.encode()})
    done = await Consumer(web.settings, pool, stores.redis, Metrics()).run_once()
    assert (done.inserted, done.debits) == (2, 2)
    balances = [await ledger.get_balance(pool, stores.redis, names, p.me["account_id"])
                for p in (exercised, control)]
    assert [b.ledger_micros for b in balances] == [TOPUP - 1234] * 2
