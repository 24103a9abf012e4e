"""What a signed-in browser does to top up, and how the tests read the ledger back."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import stripe

from control_plane import ledger
from control_plane.web.state import STORES
from tests.control_plane.web.conftest import Web, sign_in_new_user


async def signed_in(web: Web) -> tuple[str, dict[str, str]]:
    """A new user's account id and the headers a same-origin page sends."""
    me = await sign_in_new_user(web)
    return me["account_id"], {**web.same_origin, "X-CSRF-Token": me["csrf_token"]}


async def start_topup(web: Web, headers: dict[str, str], amount_cents: Any,
                      request_id: str | None = None) -> aiohttp.ClientResponse:
    body = {"amount_cents": amount_cents, "request_id": request_id or str(uuid.uuid4())}
    return await web.client.post("/api/v1/credits/topup", json=body, headers=headers)


async def balance(web: Web, account_id: str) -> ledger.Balance:
    stores = web.client.server.app[STORES]
    return await ledger.get_balance(stores.pool, stores.redis, stores.settings.names,
                                    account_id)


async def count(web: Web, sql: str, *args: Any) -> int:
    value: int = await web.client.server.app[STORES].pool.fetchval(sql, *args)
    return value


async def pay(client: stripe.StripeClient, intent: str, number: str = "4242424242424242",
              cvc: str = "123") -> None:
    """What Stripe.js does with the card form: a PaymentMethod, then the confirmation."""
    method = await client.v1.payment_methods.create_async(
        {"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2030,
                                  "cvc": cvc}})
    await client.v1.payment_intents.update_async(intent, {"payment_method": method.id})
    assert (await client.v1.payment_intents.confirm_async(intent)).status == "succeeded"
