"""Fixtures for Stripe top-ups: a real localstripe process (a stateful Stripe fake from
PyPI) on 127.0.0.1, the official ``stripe`` SDK pointed at it, and the web app with
billing configured and localstripe's webhooks registered to it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import stripe

from shared.redis_names import RedisNames
from tests.control_plane.web.conftest import (  # noqa: F401  (fixtures)
    Web,
    oidc_mock,
    serve_web,
    web_settings,
)
from tests.support import ModuleProcess, free_port, wait_for_http

STRIPE_KEY = "sk_test_qnp_localstripe"
PUBLISHABLE_KEY = "pk_test_qnp_localstripe"
WEBHOOK_SECRET = "whsec_qnp_test_secret"


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API base of a localstripe process."""
    port = free_port()
    log = tmp_path_factory.mktemp("localstripe") / "localstripe.log"
    with ModuleProcess("devstack.localstripe_server", [str(port)],
                       log_path=log):
        base = f"http://127.0.0.1:{port}"
        asyncio.run(wait_for_http(f"{base}/js.stripe.com/v3/", expect_status=200))
        yield base


@pytest.fixture
async def stripe_client(localstripe: str) -> AsyncIterator[stripe.StripeClient]:
    """The official SDK on localstripe, as the tests' stand-in for a paying browser."""
    http = stripe.AIOHTTPClient()
    yield stripe.StripeClient(STRIPE_KEY, base_addresses={"api": localstripe},
                              max_network_retries=0, http_client=http)
    await http.close_async()


async def register_webhook(localstripe: str, url: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(
            f"{localstripe}/_config/webhooks/qnp",
            data={"url": url, "secret": WEBHOOK_SECRET}) as r:
        assert r.status == 200, await r.text()


def billing_env(localstripe: str, **extra: str) -> dict[str, str]:
    return {"QNP_STRIPE_SECRET_KEY": STRIPE_KEY, "QNP_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "QNP_STRIPE_API_BASE": localstripe, "QNP_TOPUP_FEE_BPS": "500",
            "QNP_STRIPE_PUBLISHABLE_KEY": PUBLISHABLE_KEY,
            "QNP_STRIPE_JS_URL": f"{localstripe}/js.stripe.com/v3/",
            "QNP_TOPUP_FEE_FIXED_CENTS": "30", **extra}


@pytest.fixture
async def billing_web(migrated_url: str, redis_url: str, redis_names: RedisNames,
                      oidc_mock: str, localstripe: str) -> AsyncIterator[Web]:  # noqa: F811
    providers = [{"name": "dev", "label": "Dev sign-in", "issuer": oidc_mock,
                  "client_id": "qnp-dev", "client_secret": "dev-secret"}]
    port = free_port()
    settings = web_settings(migrated_url, redis_url, redis_names, port, providers,
                            **billing_env(localstripe))
    await register_webhook(localstripe, f"http://127.0.0.1:{port}/webhooks/stripe")
    async with serve_web(settings) as w:
        yield w


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    """A Stripe-Signature header exactly as Stripe makes it: t=<unix>,v1=HMAC-SHA256 of
    "<t>.<raw body>" keyed with the endpoint's secret."""
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def event(event_id: str, event_type: str, obj: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": event_id, "object": "event", "type": event_type,
                         "created": int(time.time()), "livemode": False,
                         "data": {"object": obj}})
